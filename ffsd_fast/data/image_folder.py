"""An ImageNet-style tree ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``: its file lists, and the check
that keeps unreadable images out of them.

Both loaders (DALI and torchvision) train on the lists made here, so they agree on every label: a class's index is
its folder's position in the sorted folder names, the same in ``train/`` and ``val/`` and on every rank.

A multi-day run must not die on one bad file, and a DALI pipeline cannot skip a file it fails to decode, so every
image is decoded once before training (in a process pool) and the ones that fail are left out, counted and
named in the run's log. Results are cached by (path, size, mtime), so a restarted run re-decodes only new files.
"""

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from ffsd_fast.errors import UserError
from ffsd_fast.files import write_atomic

# torchvision's IMG_EXTENSIONS: the files an ImageFolder would take.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageList:
    """Image paths and their class indices, in a fixed order (sorted by class, then by file name)."""

    files: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.files)

    def without(self, excluded: set[str]) -> "ImageList":
        kept = [(f, y) for f, y in zip(self.files, self.labels, strict=True) if f not in excluded]
        return ImageList([f for f, _ in kept], [y for _, y in kept])


@dataclass(frozen=True)
class ImageFolderIndex:
    root: str
    classes: list[str]
    train: ImageList
    val: ImageList
    corrupt: dict[str, str] = field(default_factory=dict)  # left out of train and val: path -> why it fails


def _class_folders(directory: str) -> list[str]:
    # Same rule as torchvision's find_classes, so the names agree with an ImageFolder's.
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


def _list_images(directory: str, classes: list[str]) -> ImageList:
    files, labels, empty = [], [], []
    for label, name in enumerate(classes):
        folder = os.path.join(directory, name)
        found = []
        for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            empty.append(folder)
        files += found
        labels += [label] * len(found)
    if empty:
        more = f" (and {len(empty) - 3} more)" if len(empty) > 3 else ""
        raise UserError(f"imagenet: no images in class folder {', '.join(empty[:3])}{more}")
    return ImageList(files, labels)


def find_images(root: str) -> ImageFolderIndex:
    """The tree's classes and file lists; a one-line ``UserError`` for a missing or inconsistent tree."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise UserError(
            f"imagenet: data root {root} does not exist or is not a directory (if the dataset is elsewhere on this "
            "machine, give --data-root: the folder that holds train/ and val/)"
        )
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    for directory in (train_dir, val_dir):
        if not os.path.isdir(directory):
            raise UserError(
                f"imagenet: {directory} is missing (expected {root}/train/<class>/* and {root}/val/<class>/*)"
            )
    train_classes, val_classes = _class_folders(train_dir), _class_folders(val_dir)
    if not train_classes:
        raise UserError(f"imagenet: no class folders in {train_dir} (expected {train_dir}/<class>/<image>)")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise UserError(
            f"imagenet: class folders of {val_dir} differ from {train_dir}: "
            f"only in train: {', '.join(only_train[:5]) or '-'}{' ...' if len(only_train) > 5 else ''}; "
            f"only in val: {', '.join(only_val[:5]) or '-'}{' ...' if len(only_val) > 5 else ''}"
        )
    return ImageFolderIndex(
        root, train_classes, _list_images(train_dir, train_classes), _list_images(val_dir, train_classes)
    )


def decode_error(path: str) -> str | None:
    """Why ``path`` cannot be decoded as an image (one line), or None when it decodes."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # a full decode: truncated files fail here, not at open()
            if image.width < 1 or image.height < 1:
                return "empty image"
    except Exception as error:  # noqa: BLE001 - any failure means the loaders would fail on it too
        return f"{type(error).__name__}: {' '.join(str(error).split())}"[:200]
    return None


def _signature(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def check_images(paths: list[str], workers: int, cache_path: str | None = None) -> dict[str, str]:
    """``{path: reason}`` for every path that does not decode, using and updating the cache at ``cache_path``."""
    cache: dict[str, list] = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path, encoding="utf-8") as fh:
                cache = json.load(fh)
        except (OSError, ValueError):
            cache = {}  # a damaged cache only costs a re-check
    results: dict[str, list] = {}
    todo = []
    for path in paths:
        try:
            signature = _signature(path)
        except OSError as error:
            results[path] = [None, f"unreadable: {error.strerror}"]
            continue
        cached = cache.get(path)
        if cached is not None and cached[0] == signature:
            results[path] = cached
        else:
            todo.append((path, signature))
    if todo:
        names = [p for p, _ in todo]
        if workers > 0 and len(todo) > 64:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                reasons = list(pool.map(decode_error, names, chunksize=256))
        else:
            reasons = [decode_error(p) for p in names]
        for (path, signature), reason in zip(todo, reasons, strict=True):
            results[path] = [signature, reason]
        if cache_path:
            merged = {**cache, **{p: r for p, r in results.items() if r[0] is not None}}
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
            write_atomic(cache_path, lambda fh: fh.write(json.dumps(merged).encode()))
    return {path: reason for path, (_, reason) in results.items() if reason is not None}


def leave_out(index: ImageFolderIndex, corrupt: dict[str, str]) -> ImageFolderIndex:
    """``index`` without the ``corrupt`` files; a one-line error when that empties a class."""
    if not corrupt:
        return index
    bad = set(corrupt)
    train, val = index.train.without(bad), index.val.without(bad)
    for name, kept, before in (("train", train, index.train), ("val", val, index.val)):
        emptied = sorted(set(before.labels) - set(kept.labels))
        if emptied:
            first = next(f for f, y in zip(before.files, before.labels, strict=True) if y == emptied[0])
            raise UserError(
                f"imagenet: every image of {name}/{index.classes[emptied[0]]} is unreadable "
                f"(e.g. {first}: {corrupt[first]})"
            )
    return ImageFolderIndex(index.root, index.classes, train, val, dict(sorted(corrupt.items())))


def index_images(root: str, workers: int = 4, check: bool = True, cache_path: str | None = None) -> ImageFolderIndex:
    """:func:`find_images`, then (``check``) every image decoded once and the corrupt ones left out."""
    index = find_images(root)
    if not check:
        return index
    return leave_out(index, check_images(index.train.files + index.val.files, workers, cache_path))
