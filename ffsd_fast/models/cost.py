"""What a network costs to keep and to run: its parameters, and its multiply-adds on one image."""

from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from ffsd_fast import models


@lru_cache(maxsize=64)
def cost(name: str, num_classes: int, image_size: int) -> tuple[int, int]:
    """(parameters, multiply-adds of one forward on one ``image_size`` image) of the stock ``name`` model.

    Built on the meta device: no weights are drawn (the global random state is untouched) and nothing is computed,
    so it takes well under a second even for an ImageNet model. The multiply-adds are those of its convolutions and
    matrix products (``FlopCounterMode`` counts 2 FLOPs each); BatchNorm, activations and pooling are left out, as
    model cards count them (torchvision's ResNet-18: 1.81 G)."""
    models.check_image_size(name, image_size)
    with torch.device("meta"):
        network = models.create(name, num_classes).eval()
        image = torch.zeros(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(image)
    return sum(p.numel() for p in network.parameters()), counter.get_total_flops() // 2
