"""Load weights saved by the authors' reference implementation, to compare the two from identical weights.

The reference saves each network on its own (``torch.save({'weight': state_dict, …})``). Every backbone of the
CIFAR zoo (the ResNets, WRN-16-2/40-2 in either block layout, DenseNet-40, GoogLeNet; held to the reference's
keys by ``tests/unit/models/reference_layout.json``) and the decoders share the reference's parameter names and
order, so a student loads as it is (``student_from_reference``); the leader's trans-fusion head and the fusion
module only need renaming.
"""

import torch

# The reference's conv → BN → ReLU → conv → BN → ReLU attributes, against our nn.Sequential indices.
_BLOCK = {"conv1.": "0.", "bn1.": "1.", "conv1_1.": "3.", "bn1_1.": "4."}
_HEAD = "trans_fusion_module."


def _rename_block(key: str) -> str | None:
    for theirs, ours in _BLOCK.items():
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


def student_from_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference common student (a bare backbone) → our backbone's state dict: the same keys."""
    return dict(state)


def leader_from_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference leader (backbone with ``trans_fusion_module``) → our ``Leader`` state dict."""
    out = {}
    for key, value in state.items():
        if key.startswith(_HEAD):
            out["head." + _rename_block(key[len(_HEAD) :])] = value
        else:
            out["backbone." + key] = value
    return out


def fusion_from_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference ``FusionModule`` (``conv1, bn1, conv1_1, bn1_1, fc2``) → our ``FusionModule`` state dict."""
    out = {}
    for key, value in state.items():
        if key.startswith("fc2."):
            out["fc." + key[len("fc2.") :]] = value
        else:
            out["block." + _rename_block(key)] = value
    return out


def unwrap(saved: dict) -> dict[str, torch.Tensor]:
    """The state dict inside a reference checkpoint file (``{'weight': …}``), or the dict itself."""
    state = saved.get("weight", saved)
    return {k.removeprefix("module."): v for k, v in state.items()}  # nn.DataParallel's prefix (ImageNet runs)
