"""The small example media shipped in ``assets/examples`` and how they are made.

Photos come from scikit-image's bundled sample data (real photographs, no download needed); the
videos are built from those photos (pans with a zoom, a hard cut), encoded as H.264/yuv420p MP4
so every browser plays them. Output is deterministic, so regenerating gives the same pictures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np
from PIL import Image
from skimage import data

__all__ = ["EXAMPLE_PHOTOS", "EXAMPLE_VIDEOS", "make_examples"]

#: Output file name -> scikit-image sample loader.
EXAMPLE_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "cat.jpg": data.chelsea,
    "coffee.jpg": data.coffee,
    "rocket.jpg": data.rocket,
}
EXAMPLE_VIDEOS = ("cat_pan.mp4", "coffee_rocket_cut.mp4", "coffee_pan.mp4")

PHOTO_MAX_SIDE = 512
JPEG_QUALITY = 85
VIDEO_SIZE = 256  # square frames; even, as yuv420p needs
VIDEO_FPS = 10
VIDEO_SECONDS = 4
VIDEO_CRF = 23  # x264 quality (lower is better); each clip stays far under 500 KB


def make_examples(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the example photos and videos into ``out_dir`` (created if needed).

    Returns the written paths, photos first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photos = {name: _photo(loader) for name, loader in EXAMPLE_PHOTOS.items()}
    written = []
    for name, photo in photos.items():
        photo.save(out / name, "JPEG", quality=JPEG_QUALITY, optimize=True)
        written.append(out / name)
    clips = {
        "cat_pan.mp4": _pan_and_zoom(photos["cat.jpg"]),
        "coffee_rocket_cut.mp4": _cut(photos["coffee.jpg"], photos["rocket.jpg"]),
        # Not the motorcycle photo: that one belongs to the unseen caption-eval set.
        "coffee_pan.mp4": _pan_and_zoom(photos["coffee.jpg"]),
    }
    for name, frames in clips.items():
        _write_mp4(out / name, frames)
        written.append(out / name)
    return written


def _photo(loader: Callable[[], np.ndarray]) -> Image.Image:
    """A sample photo as RGB, shrunk so its longer side is at most ``PHOTO_MAX_SIDE``."""
    image = Image.fromarray(loader()).convert("RGB")
    scale = PHOTO_MAX_SIDE / max(image.size)
    if scale < 1:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _frame_count(seconds: float = VIDEO_SECONDS) -> int:
    return round(seconds * VIDEO_FPS)


def _view(photo: Image.Image, cx: float, cy: float, side: float) -> Image.Image:
    """The square of ``side`` pixels centred on (cx, cy), kept inside the photo, resized."""
    side = min(side, photo.width, photo.height)
    x0 = min(max(cx - side / 2, 0), photo.width - side)
    y0 = min(max(cy - side / 2, 0), photo.height - side)
    box = (x0, y0, x0 + side, y0 + side)
    return photo.resize((VIDEO_SIZE, VIDEO_SIZE), Image.Resampling.BICUBIC, box=box)


def _ease(t: float) -> float:
    """Smooth start and stop for camera moves (t in [0, 1])."""
    return 0.5 - 0.5 * math.cos(math.pi * t)


def _pan_and_zoom(photo: Image.Image) -> Iterator[Image.Image]:
    """A slow pan from left to right across the photo while zooming in."""
    count = _frame_count()
    full = min(photo.size)
    for i in range(count):
        t = _ease(i / (count - 1))
        side = full * (1.0 - 0.35 * t)
        cx = photo.width * (0.3 + 0.4 * t)
        yield _view(photo, cx, photo.height / 2, side)


def _cut(first: Image.Image, second: Image.Image) -> Iterator[Image.Image]:
    """Half the clip zooming slowly into ``first``, then a hard cut to a pan over ``second``."""
    half = _frame_count() // 2
    for i in range(half):
        t = i / (half - 1)
        yield _view(first, first.width / 2, first.height / 2, min(first.size) * (1 - 0.2 * t))
    for i in range(_frame_count() - half):
        t = i / (half - 1)
        cx = second.width * (0.35 + 0.3 * t)
        yield _view(second, cx, second.height / 2, min(second.size))


def _write_mp4(path: Path, frames: Iterator[Image.Image]) -> None:
    """Encode frames as H.264 yuv420p MP4 (moov atom first, so browsers can start at once)."""
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(VIDEO_CRF), "preset": "slow"}
        stream.codec_context.thread_count = 1  # one thread: identical bytes on every machine
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_image(image)
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
