"""Writes ``reference_layout.json``: the state-dict keys and shapes, in order, and the multiply-adds of one 32 px
image, of each CIFAR backbone as the authors' reference implementation (SJLeo/FFSD, ``models/``) defines it.

Written by hand from reading the reference's definitions, independently of ``ffsd_fast.models``: plain
arithmetic, no torch modules. Multiply-adds count the convolutions' and Linear layers' weight products
(``C_in · C_out · k² · H_out · W_out`` per conv, ``in · out`` per Linear), not BN, biases or pooling.

    python tests/unit/models/make_reference_layout.py   # rewrites the JSON next to this file
"""

import json
import pathlib

SIZE = 32  # input side in px
CLASSES = 100


class Layout:
    """Accumulates state-dict entries (params, then buffers, per module, in registration order) and multiply-adds."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, list[int]]] = []
        self.macs = 0

    def conv(self, name: str, cin: int, cout: int, k: int, out_size: int, bias: bool) -> None:
        self.keys.append((f"{name}.weight", [cout, cin, k, k]))
        if bias:
            self.keys.append((f"{name}.bias", [cout]))
        self.macs += cin * cout * k * k * out_size * out_size

    def bn(self, name: str, c: int) -> None:
        self.keys += [(f"{name}.{p}", [c]) for p in ("weight", "bias", "running_mean", "running_var")]
        self.keys.append((f"{name}.num_batches_tracked", []))

    def linear(self, name: str, cin: int, cout: int) -> None:
        self.keys += [(f"{name}.weight", [cout, cin]), (f"{name}.bias", [cout])]
        self.macs += cin * cout


def down(size: int, stride: int) -> int:
    """Output side of a 3×3/pad-1 or 1×1/pad-0 conv, or a 3/2/1 max-pool, at ``stride``."""
    return (size - 1) // stride + 1


def resnet(depth: int) -> Layout:
    # models/resnet_cifar.py: conv1 (no bias) + bn1; torchvision-style BasicBlocks (conv1 with the stride, bn1,
    # conv2, bn2, downsample = Sequential(conv1x1 with the stride, BN) where the shape changes); fc.
    n = (depth - 2) // 6
    m, s, cin = Layout(), SIZE, 16
    m.conv("conv1", 3, 16, 3, s, bias=False)
    m.bn("bn1", 16)
    for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        for i in range(n):
            st = stride if i == 0 else 1
            out = down(s, st)
            p = f"layer{stage}.{i}"
            m.conv(f"{p}.conv1", cin, planes, 3, out, bias=False)
            m.bn(f"{p}.bn1", planes)
            m.conv(f"{p}.conv2", planes, planes, 3, out, bias=False)
            m.bn(f"{p}.bn2", planes)
            if st != 1 or cin != planes:
                m.conv(f"{p}.downsample.0", cin, planes, 1, out, bias=False)
                m.bn(f"{p}.downsample.1", planes)
            cin, s = planes, out
    m.linear("fc", 64, CLASSES)
    return m


def wrn(depth: int, k: int, stride_on_conv2: bool = True) -> Layout:
    # models/wideresnet_cifar.py: conv1 (3→16, bias); wide_basic = bn1, conv1 (3×3, stride 1, bias), [dropout], bn2,
    # conv2 (3×3, the block's stride, bias), shortcut = Sequential(conv1x1 with the stride, bias) where the shape
    # changes; final bn1 (momentum 0.9), linear. stride_on_conv2=False: the clean layout (stride on conv1).
    n = (depth - 4) // 6
    m, s, cin = Layout(), SIZE, 16
    m.conv("conv1", 3, 16, 3, s, bias=True)
    for stage, (planes, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
        for i in range(n):
            st = stride if i == 0 else 1
            out = down(s, st)
            p = f"layer{stage}.{i}"
            m.bn(f"{p}.bn1", cin)
            m.conv(f"{p}.conv1", cin, planes, 3, s if stride_on_conv2 else out, bias=True)
            m.bn(f"{p}.bn2", planes)
            m.conv(f"{p}.conv2", planes, planes, 3, out, bias=True)
            if st != 1 or cin != planes:
                m.conv(f"{p}.shortcut.0", cin, planes, 1, out, bias=True)
            cin, s = planes, out
    m.bn("bn1", 64 * k)
    m.linear("linear", 64 * k, CLASSES)
    return m


def densenet(depth: int = 40, growth: int = 12) -> Layout:
    # models/densenet_cifar.py: conv1 (3→2k, no bias); DenseBasicBlock = bn1, relu, conv1 (3×3 → k, no bias);
    # Transition = bn1, relu, conv1 (1×1, no compression, no bias), avg-pool 2; final bn, fc.
    n = (depth - 4) // 3
    m, s, c = Layout(), SIZE, 2 * growth
    m.conv("conv1", 3, c, 3, s, bias=False)
    for block in (1, 2, 3):
        for i in range(n):
            m.bn(f"dense{block}.{i}.bn1", c)
            m.conv(f"dense{block}.{i}.conv1", c, growth, 3, s, bias=False)
            c += growth
        if block < 3:
            m.bn(f"trans{block}.bn1", c)
            m.conv(f"trans{block}.conv1", c, c, 1, s, bias=False)
            s //= 2
    m.bn("bn", c)
    m.linear("fc", c, CLASSES)
    return m


# models/googlenet_cifar.py: per inception (name, 1×1, 3×3 reduce, 3×3, "5×5" reduce, "5×5", pool planes); the
# "5×5" branch's middle conv has the "5×5" width (n5x5red2 = filters[i][2]).
GOOGLENET = [
    ("a3", 64, 96, 128, 16, 32, 32),
    ("b3", 128, 128, 192, 32, 96, 64),
    ("a4", 192, 96, 208, 16, 48, 64),
    ("b4", 160, 112, 224, 24, 64, 64),
    ("c4", 128, 128, 256, 24, 64, 64),
    ("d4", 112, 144, 288, 32, 64, 64),
    ("e4", 256, 160, 320, 32, 128, 128),
    ("a5", 256, 160, 320, 32, 128, 128),
    ("b5", 384, 192, 384, 48, 128, 128),
]


def googlenet() -> Layout:
    # pre_layers = (conv 3→192 3×3 with bias, BN, ReLU); inceptions with branch1x1 (conv, BN, ReLU), branch3x3
    # (1×1, BN, ReLU, 3×3, BN, ReLU), branch5x5 (1×1, BN, ReLU, 3×3, BN, ReLU, 3×3, BN, ReLU), branch_pool (max-pool,
    # 1×1, BN, ReLU), every conv with a bias; maxpool1 after b3, maxpool2 after e4 (3, stride 2, pad 1); linear.
    m, s, cin = Layout(), SIZE, 192
    m.conv("pre_layers.0", 3, 192, 3, s, bias=True)
    m.bn("pre_layers.1", 192)
    for name, n1, r3, n3, r5, n5, pool in GOOGLENET:
        if name in ("a4", "a5"):
            s = down(s, 2)
        p = f"inception_{name}"
        m.conv(f"{p}.branch1x1.0", cin, n1, 1, s, bias=True)
        m.bn(f"{p}.branch1x1.1", n1)
        m.conv(f"{p}.branch3x3.0", cin, r3, 1, s, bias=True)
        m.bn(f"{p}.branch3x3.1", r3)
        m.conv(f"{p}.branch3x3.3", r3, n3, 3, s, bias=True)
        m.bn(f"{p}.branch3x3.4", n3)
        m.conv(f"{p}.branch5x5.0", cin, r5, 1, s, bias=True)
        m.bn(f"{p}.branch5x5.1", r5)
        m.conv(f"{p}.branch5x5.3", r5, n5, 3, s, bias=True)
        m.bn(f"{p}.branch5x5.4", n5)
        m.conv(f"{p}.branch5x5.6", n5, n5, 3, s, bias=True)
        m.bn(f"{p}.branch5x5.7", n5)
        m.conv(f"{p}.branch_pool.1", cin, pool, 1, s, bias=True)
        m.bn(f"{p}.branch_pool.2", pool)
        cin = n1 + n3 + n5 + pool
    m.linear("linear", cin, CLASSES)
    return m


def build() -> dict:
    layouts = {
        "resnet20": resnet(20),
        "resnet32": resnet(32),
        "resnet56": resnet(56),
        "resnet110": resnet(110),  # not in the reference's list; its ResNet with [18, 18, 18] blocks
        "wrn16_2": wrn(16, 2),
        "wrn40_2": wrn(40, 2),
        "densenet40": densenet(),
        "googlenet": googlenet(),
    }
    out = {}
    for name, m in layouts.items():
        params = sum(_numel(shape) for key, shape in m.keys if not _is_buffer(key))
        out[name] = {"params": params, "macs": m.macs, "state_dict": [[key, shape] for key, shape in m.keys]}
    for name, depth in (("wrn16_2_clean", 16), ("wrn40_2_clean", 40)):
        clean = wrn(depth, 2, stride_on_conv2=False)
        out[name] = {"params": out[name[: -len("_clean")]]["params"], "macs": clean.macs}
    return {"image_size": SIZE, "num_classes": CLASSES, "models": out}


def _is_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dump(data: dict) -> str:
    """JSON with one state-dict entry a line (diffable)."""
    lines = ["{", f'"image_size": {data["image_size"]},', f'"num_classes": {data["num_classes"]},', '"models": {']
    items = list(data["models"].items())
    for n, (name, entry) in enumerate(items):
        head = f'"{name}": {{"params": {entry["params"]}, "macs": {entry["macs"]}'
        if "state_dict" not in entry:
            lines.append(head + "}" + ("," if n < len(items) - 1 else ""))
            continue
        lines.append(head + ', "state_dict": [')
        rows = [json.dumps(row) for row in entry["state_dict"]]
        lines += [row + "," for row in rows[:-1]] + [rows[-1]]
        lines.append("]}" + ("," if n < len(items) - 1 else ""))
    return "\n".join([*lines, "}", "}"]) + "\n"


if __name__ == "__main__":
    path = pathlib.Path(__file__).with_name("reference_layout.json")
    path.write_text(_dump(build()))
    for name, entry in build()["models"].items():
        print(f"{name}: {entry['params']:,} parameters, {entry['macs']:,} multiply-adds")
