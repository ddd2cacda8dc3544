"""Files written whole (``ffsd_fast.files``) follow the umask, as any other new file does (they were 0600)."""

import os
import stat

import pytest

from ffsd_fast.files import current_umask, write_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        write_atomic(str(tmp_path / "summary.json"), lambda fh: fh.write(b"{}"))
        (tmp_path / "plain.txt").write_text("")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "summary.json").st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert (tmp_path / "summary.json").read_bytes() == b"{}"
