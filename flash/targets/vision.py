"""MobileNetV2 (ImageNet-1k) in plain torch, laid out like torchvision so its weights load as is.

torchvision is not a dependency (its wheels don't match the CPU torch build this project pins), so
the ~60 lines of architecture live here. The state-dict keys match torchvision's
``mobilenet_v2`` exactly; ``load_state_dict(strict=True)`` proves it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Input side the weights were trained at; the 7x7 feature map gives 49 visual tokens.
INPUT_SIZE = 224
RESIZE_SIZE = 256
FEATURE_GRID = 7

# (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_relu(inp, hidden, kernel=1)]
        layers += [
            _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """ImageNet MobileNetV2 (width 1.0). ``features`` gives [B, 1280, 7, 7] for 224x224 input."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                layers.append(_InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(_conv_bn_relu(inp, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (per-location class logits [B, 49, 1000], global class logits [B, 1000])."""
        fmap = self.features(x)  # [B, 1280, 7, 7]
        local = self.classifier(fmap.flatten(2).transpose(1, 2))  # [B, 49, 1000]
        global_ = self.classifier(fmap.mean(dim=(2, 3)))  # [B, 1000]: the way the weights were trained
        return local, global_


def preprocess(frames: list[Image.Image] | tuple[Image.Image, ...]) -> torch.Tensor:
    """Resize the short side to 256, centre-crop 224, normalise: how the ImageNet weights expect it."""
    batch = []
    for frame in frames:
        img = frame.convert("RGB")
        w, h = img.size
        scale = RESIZE_SIZE / min(w, h)
        img = img.resize((max(INPUT_SIZE, round(w * scale)), max(INPUT_SIZE, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - INPUT_SIZE) // 2, (h - INPUT_SIZE) // 2
        img = img.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE))
        batch.append(np.asarray(img, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_mobilenet_v2(weights_path: str) -> MobileNetV2:
    """Build MobileNetV2 and load torchvision's ImageNet state dict (strict)."""
    model = MobileNetV2()
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
