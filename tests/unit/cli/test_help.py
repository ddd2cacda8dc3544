"""``--help`` shows every option's default (the configs send readers there for lr, momentum, temperature, the output
folder) and no reStructuredText markup."""

import re

import pytest

from ffsd_fast.cli.eval import main as eval_main
from ffsd_fast.cli.export import main as export_main
from ffsd_fast.cli.report import main as report_main
from ffsd_fast.cli.train import main as train_main
from ffsd_fast.trainer.config import FIELDS, flag_of


def help_text(capsys, main) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def entries(text: str) -> dict[str, str]:
    """Each option's help, joined onto one line, keyed by its first flag."""
    found, current = {}, None
    for line in text.splitlines():
        start = re.match(r"^  (-{1,2}[\w-]+)", line)
        if start:
            current = start.group(1)
            found[current] = line
        elif current and line.startswith("      "):
            found[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in found.items()}


@pytest.mark.parametrize(
    "main", [train_main, eval_main, export_main, report_main], ids=["train", "eval", "export", "report"]
)
def test_help_has_no_rst_markup_and_shows_every_default(capsys, main):
    text = help_text(capsys, main)
    assert "``" not in text and ":func:" not in text
    required = {"--out"} if main is export_main else set()  # no default to show
    for flag, entry in entries(text).items():
        if flag != "-h" and flag not in required:
            assert "default" in entry, f"{flag}: {entry}"


def test_train_help_shows_the_values_of_its_defaults(capsys):
    shown = entries(help_text(capsys, train_main))
    for flag, value in [("--lr", "0.1"), ("--momentum", "0.9"), ("--temperature", "2.0"), ("--output-dir", "runs")]:
        assert f"(default: {value})" in shown[flag], shown[flag]
    assert {flag_of(name) for name in FIELDS} <= set(shown)
