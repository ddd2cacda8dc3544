"""Input-pipeline throughput: the DALI and torchvision training loaders side by side, over one JPEG tree.

    python benchmarks/data_throughput.py --loader dali,torchvision --device cpu --threads 2 --images 512 \\
        --batch-size 64 --image-size 224
    python benchmarks/data_throughput.py --device cuda --threads 16 --images 20000 --batch-size 256 \\
        --data-root /tmp/jpegs

The tree (``train/<class>/*.jpg`` over 10 classes and a small ``val/``) is generated in a temporary folder, or in
``--data-root`` when that has none yet; a ``--data-root`` that already holds ``train/`` and ``val/`` (a real
ImageNet, or an earlier run's tree) is read as it is. Generated images are ImageNet-like: about 500x375 pixels, a
gradient plus noise, about 100 KB as JPEG.

Each loader is the trainer's training loader (RandomResizedCrop, flip, normalise, on ``--device``) with the same
parallelism: ``--threads`` is DALI's thread count and the DataLoader's worker count. After ``--warmup`` batches
(pipeline start-up, worker start-up), ``--batches`` batches are timed (default: the rest of the first epoch; more
run on into the next epochs). One JSON line per loader is appended to ``--out``; a table is printed last.
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ffsd_fast.data.image_folder import ImageFolderIndex, find_images  # noqa: E402
from ffsd_fast.trainer.runlog import commit_label  # noqa: E402

LOADERS = ("dali", "torchvision")
CLASSES = 10
VAL_PER_CLASS = 2
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "data_throughput.jsonl"


def _write_jpeg(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(400, 601)), int(rng.integers(300, 451))
    if rng.random() < 0.25:
        width, height = height, width  # some portrait images, as in ImageNet
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 64], -1)
    # Noise makes the files as large (and as slow to decode) as photographs: a bare gradient compresses to ~10 KB.
    pixels = np.clip(gradient + rng.normal(0, 25, gradient.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_tree(root: Path, images: int) -> None:
    """``images`` training JPEGs over ``CLASSES`` classes, and ``VAL_PER_CLASS`` per class in ``val/``."""
    jobs = [(root / "train" / f"class{i % CLASSES:02d}" / f"{i:07d}.jpg", i) for i in range(images)]
    jobs += [
        (root / "val" / f"class{k:02d}" / f"{j}.jpg", images + k * VAL_PER_CLASS + j)
        for k in range(CLASSES)
        for j in range(VAL_PER_CLASS)
    ]
    for path, _ in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # numpy and PIL's encoder release the GIL
        list(pool.map(lambda job: _write_jpeg(*job), jobs))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores)"


def versions() -> dict:
    found = {"torch": torch.__version__, "triton": None, "dali": None}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import nvidia.dali

        found["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return found


def build_loader(name: str, index: ImageFolderIndex, args: argparse.Namespace, device: torch.device):
    options = dict(
        image_size=args.image_size,
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        device=device,
        seed=0,
        rank=0,
        world_size=1,
        drop_last=True,
        channels_last=args.channels_last,
    )
    if name == "dali":
        from ffsd_fast.data.dali_loader import dali_available, dali_loaders

        if not dali_available():
            raise SystemExit("--loader dali: nvidia.dali (with its PyTorch plugin) does not import here")
        return dali_loaders(index.train, index.val, threads=args.threads, **options)[0]
    try:
        from ffsd_fast.data.torchvision_loader import torchvision_loaders
    except ImportError as error:
        raise SystemExit(
            f"--loader torchvision: ffsd_fast.data.torchvision_loader is not importable ({error})"
        ) from None
    return torchvision_loaders(index.train, index.val, workers=args.threads, **options)[0]


def _batches(loader):
    """The loader's batches epoch after epoch, without end."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(loader, warmup: int, timed: int, device: torch.device) -> float:
    """Seconds for ``timed`` batches after ``warmup`` ones."""
    batches = _batches(loader)
    try:
        for _ in range(warmup):
            next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(timed):
            next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    finally:
        batches.close()  # ends the pipeline or the workers now, not at some later garbage collection


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loader", default=",".join(LOADERS), help="comma-separated: dali, torchvision")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=2048, help="training images to generate")
    parser.add_argument(
        "--threads", type=int, default=min(8, os.cpu_count() or 1), help="DALI threads = DataLoader workers"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--channels-last", action="store_true", help="NHWC batches (DALI's HWC output)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default: the rest of an epoch)")
    parser.add_argument("--data-root", default=None, help="where the tree is, or is to be generated")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON lines file to append to")
    args = parser.parse_args(argv)
    args.loaders = [name.strip() for name in args.loader.split(",") if name.strip()]
    unknown = sorted(set(args.loaders) - set(LOADERS))
    if unknown or not args.loaders:
        parser.error(f"--loader: expected some of {', '.join(LOADERS)}, got {args.loader!r}")
    if min(args.images, args.threads, args.batch_size, args.image_size) < 1 or args.warmup < 0:
        parser.error("--images, --threads, --batch-size and --image-size must be positive, --warmup not negative")
    return args


def run(args: argparse.Namespace, root: Path) -> list[dict]:
    device = torch.device(args.device)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        print(f"generating {args.images} JPEGs in {root} ...", flush=True)
        make_tree(root, args.images)
    index = find_images(str(root))
    jpeg_kb = float(np.mean([os.path.getsize(f) for f in index.train.files[:1000]])) / 1e3
    common = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        **versions(),
        "commit": commit_label(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "channels_last": args.channels_last,
        "images": len(index.train),
        "jpeg_kb": round(jpeg_kb, 1),
    }
    rows = {}
    # torchvision first: forking DataLoader workers after DALI has started its threads is not safe.
    for name in sorted(args.loaders, key=lambda n: n != "torchvision"):
        loader = build_loader(name, index, args, device)
        timed = args.batches if args.batches is not None else max(1, len(loader) - args.warmup)
        seconds = measure(loader, args.warmup, timed, device)
        rows[name] = {
            **common,
            "loader": name,
            "warmup": args.warmup,
            "batches": timed,
            "seconds": round(seconds, 4),
            "images_per_s": round(timed * args.batch_size / seconds, 1),
        }
        del loader
    rows = [rows[name] for name in args.loaders]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def print_table(rows: list[dict]) -> None:
    by_name = {row["loader"]: row for row in rows}
    first = rows[0]
    print(
        f"\n{first['device']}, {first['threads']} threads, batch {first['batch_size']}, "
        f"{first['image_size']} px, {first['images']} images of ~{first['jpeg_kb']} KB"
    )
    print(f"{'loader':<12} {'images/s':>10} {'batches':>8} {'seconds':>8}")
    for row in rows:
        print(f"{row['loader']:<12} {row['images_per_s']:>10.1f} {row['batches']:>8} {row['seconds']:>8.2f}")
    if {"dali", "torchvision"} <= by_name.keys():
        ratio = by_name["dali"]["images_per_s"] / by_name["torchvision"]["images_per_s"]
        print(f"dali / torchvision: {ratio:.2f}x")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.data_root:
        rows = run(args, Path(args.data_root).expanduser())
    else:
        with tempfile.TemporaryDirectory(prefix="ffsd-jpegs-") as root:
            rows = run(args, Path(root))
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
