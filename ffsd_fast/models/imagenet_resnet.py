"""torchvision's ResNet-18/34/50, unchanged in parameters, with a forward that also returns the stage outputs."""

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

_CONFIGS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
}


class ImageNetResNet(ResNet):
    """A torchvision ResNet (same state dict, same init) whose forward returns (logits, [f1, f2, f3, f4])."""

    def __init__(self, depth: int, num_classes: int) -> None:
        if depth not in _CONFIGS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(_CONFIGS)}, got {depth}")
        block, layers = _CONFIGS[depth]
        super().__init__(block, layers, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        logits = self.fc(torch.flatten(self.avgpool(f4), 1))
        return logits, [f1, f2, f3, f4]
