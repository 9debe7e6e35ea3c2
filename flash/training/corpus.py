"""A training corpus that needs no hub: procedural scenes, and augmented real photos from packages.

Real photos come from scikit-image's bundled data (training) and gradio's bundled media (held out:
the draft never sees them). Procedural media are scenes of shapes, textures, moving objects and
cuts, drawn with PIL from a seed, so the corpus is reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from flash.media import Media

IMAGE_PROMPTS = (
    "Describe this image in detail.",
    "What is in this picture?",
    "Describe this image in one sentence.",
    "List the main objects in this image.",
    "Write a short caption for this photo.",
    "What can you tell me about this image?",
    "Describe the scene and its colours.",
    "Explain what this picture shows to a child.",
)
VIDEO_PROMPTS = (
    "Describe what happens in this video.",
    "Summarise this video in a few sentences.",
    "What is shown in this video clip?",
    "Describe the video frame by frame.",
    "Write a short caption for this video.",
)
TRAIN_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field",
                "immunohistochemistry", "retina", "colorwheel", "camera", "horse", "brick", "grass", "gravel",
                "moon", "coins", "clock", "logo")
HELDOUT_PHOTOS = ("cheetah.jpg", "cheetah1.jpg", "lion.jpg", "bus.png", "tower.jpg", "groot.jpeg")
HELDOUT_VIDEOS = ("a.mp4", "b.mp4", "world.mp4")


@dataclass(frozen=True)
class CorpusItem:
    """One (media, prompt) pair with a stable id and its split."""

    item_id: str
    media: Media
    prompt: str
    split: str  # "train" or "heldout"

    @property
    def kind(self) -> str:
        return self.media.kind

    @property
    def frame_count(self) -> int:
        return len(self.media.frames)


@dataclass(frozen=True)
class MediaFileItem:
    """A user's media file as a corpus item, decoded each time ``media`` is read.

    A folder of photos or videos never sits in memory at once this way (a 12 MP photo decodes to
    36 MB); distillation reads each item's media once, when it builds the item's prompt.
    """

    item_id: str
    path: Path
    prompt: str
    split: str
    kind: str
    frame_count: int

    @property
    def media(self) -> Media:
        from flash.media import load_media

        return load_media(self.path)


def _skimage_photo(name: str) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle is (left, right, disparity)
    return Image.fromarray(arr if arr.dtype == np.uint8 else arr.astype(np.uint8) * 255).convert("RGB")


def _augment(img: Image.Image, rng: random.Random, size: int = 320) -> Image.Image:
    w, h = img.size
    scale = rng.uniform(0.55, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((left, top, left + cw, top + ch)).resize((size, size))
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))


def procedural_scene(rng: random.Random, size: int = 256) -> tuple[Image.Image, list[dict]]:
    """A random scene of shapes on a textured background, and its shapes (to animate them)."""
    img = Image.new("RGB", (size, size), _colour(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 40)):  # background texture: stripes or dots
        x = rng.randrange(size)
        draw.line((x, 0, x + rng.randint(-40, 40), size), fill=_colour(rng), width=rng.randint(1, 4))
    shapes = [{"kind": rng.choice(("ellipse", "rectangle", "polygon")), "x": rng.uniform(0, size),
               "y": rng.uniform(0, size), "r": rng.uniform(12, 70), "colour": _colour(rng),
               "dx": rng.uniform(-8, 8), "dy": rng.uniform(-8, 8)} for _ in range(rng.randint(1, 6))]
    _draw_shapes(draw, shapes)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2))), shapes


def _draw_shapes(draw: ImageDraw.ImageDraw, shapes: list[dict], t: int = 0) -> None:
    for s in shapes:
        x, y, r = s["x"] + s["dx"] * t, s["y"] + s["dy"] * t, s["r"]
        box = (x - r, y - r, x + r, y + r)
        if s["kind"] == "ellipse":
            draw.ellipse(box, fill=s["colour"])
        elif s["kind"] == "rectangle":
            draw.rectangle(box, fill=s["colour"])
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=s["colour"])


def procedural_video(rng: random.Random, photos: list[Image.Image], frames: int = 8) -> Media:
    """Moving shapes, a pan over a photo, or a cut between two scenes."""
    style = rng.choice(("shapes", "pan", "cut"))
    out: list[Image.Image] = []
    if style == "shapes":
        background, shapes = procedural_scene(rng)
        base = Image.new("RGB", background.size, _colour(rng))
        for t in range(frames):
            frame = base.copy()
            _draw_shapes(ImageDraw.Draw(frame), shapes, t)
            out.append(frame)
    elif style == "pan":
        photo = rng.choice(photos)
        w, h = photo.size
        side = min(w, h) * rng.uniform(0.5, 0.8)
        for t in range(frames):
            x = (w - side) * t / max(frames - 1, 1)
            out.append(photo.crop((int(x), 0, int(x + side), int(side))).resize((256, 256)))
    else:
        a, b = rng.sample(photos, 2)
        cut = rng.randint(2, frames - 2)
        out = [_augment(a if t < cut else b, rng, 256) for t in range(frames)]
    return Media(kind="video", frames=tuple(out), source=f"procedural-{style}", duration_s=frames / 4.0,
                 size=out[0].size)


def build_corpus(num_train: int, num_heldout: int, seed: int = 0, video_fraction: float = 0.3,
                 gradio_media: Path | None = None, *, first_item: int = 0,
                 shard: tuple[int, int] = (0, 1)) -> list[CorpusItem]:
    """Make ``num_train`` training and ``num_heldout`` held-out (media, prompt) items, held-out first.

    ``first_item`` leaves out the training items before it; ``shard=(i, n)`` keeps every n-th item of
    the result from the i-th (what one of n distillation processes makes). Items left out are still
    drawn, so item k is the same whatever is kept, but their media are not kept in memory.
    """
    index, count = shard
    rng = random.Random(seed)
    photos = [_skimage_photo(name) for name in TRAIN_PHOTOS]
    # Held-out items first: an interrupted distillation still has its evaluation split.
    held = heldout_items(num_heldout, seed + 1, gradio_media)
    items: list[CorpusItem] = held[index::count]
    position = len(held)  # the next training item's place in the unsharded result
    for i in range(num_train):
        if rng.random() < video_fraction:
            media, prompt = procedural_video(rng, photos), rng.choice(VIDEO_PROMPTS)
        else:
            img = _augment(rng.choice(photos), rng) if rng.random() < 0.6 else procedural_scene(rng)[0]
            media = Media(kind="image", frames=(img,), source="train", size=img.size)
            prompt = rng.choice(IMAGE_PROMPTS)
        if i < first_item:
            continue
        if position % count == index:
            items.append(CorpusItem(f"train-{i:05d}", media, prompt, "train"))
        position += 1
    return items


IMAGENET_CLASSES = 1000


def class_labels(count: int, seed: int = 0) -> list[tuple[tuple[int, float], ...]]:
    """``count`` labels for :func:`class_items`: ImageNet's classes in turn, in a seeded order (each class
    once per 1000), as (index, probability) pairs. As on real photos, about 60% are confident (one class,
    p 0.5-0.95) and the rest a guess between the class and a neighbouring one (ImageNet's indices group
    related classes: breeds, vehicles), the class first."""
    rng = random.Random(seed + 2)
    order: list[int] = []
    labels = []
    for _ in range(count):
        if not order:
            order = rng.sample(range(IMAGENET_CLASSES), IMAGENET_CLASSES)
        cls = order.pop()
        if rng.random() < 0.6:
            labels.append(((cls, round(rng.uniform(0.5, 0.95), 3)),))
        else:
            near = min(max(cls + rng.choice((-1, 1)) * rng.randint(1, 4), 0), IMAGENET_CLASSES - 1)
            if near == cls:  # the first or last class stepping outwards
                near = cls + 1 if cls == 0 else cls - 1
            first = rng.uniform(0.2, 0.49)
            labels.append(((cls, round(first, 3)), (near, round(rng.uniform(0.05, first), 3))))
    return labels


def class_items(count: int, seed: int = 0, *, shard: tuple[int, int] = (0, 1)) -> list[CorpusItem]:
    """``count`` training items labelled by :func:`class_labels`, for the embedded models, whose captions
    follow their classifier's classes (:attr:`flash.media.Media.classes`).

    The built-in corpus's 18 photos give a draft captions of about 18 subjects, and it learns those
    (teacher-forced τ 2.7-3.3 on the shipped cat and coffee, ~2.0 on photos of other subjects): these
    items spread its data over every subject the classifier can name. The media are the corpus's
    augmented photos and procedural scenes, a quarter of them 8-frame videos. ``shard=(i, n)`` keeps
    ``items[i::n]`` (every item's media are still drawn, so item k is the same whatever is kept).
    """
    index, step = shard
    rng = random.Random(seed + 3)
    photos = [_skimage_photo(name) for name in TRAIN_PHOTOS]
    items = []
    for i, classes in enumerate(class_labels(count, seed)):
        video = rng.random() < 0.25
        if video:
            frames = procedural_video(rng, photos).frames
        else:
            frames = (_augment(rng.choice(photos), rng) if rng.random() < 0.6 else procedural_scene(rng)[0],)
        if i % step != index:
            continue
        media = Media(kind="video" if video else "image", frames=frames, source="train-class",
                      size=frames[0].size, duration_s=len(frames) / 4.0 if video else None, classes=classes)
        items.append(CorpusItem(f"class-{i:05d}", media, "", "train"))
    return items


def heldout_items(count: int, seed: int = 1, gradio_media: Path | None = None) -> list[CorpusItem]:
    """Held-out media the draft never trains on: gradio's bundled photos/videos and new procedural scenes."""
    from flash.media import load_media

    rng = random.Random(seed)
    root = gradio_media or Path(__import__("gradio").__file__).parent / "media_assets"
    real = [load_media(root / "images" / n) for n in HELDOUT_PHOTOS if (root / "images" / n).exists()]
    real += [load_media(root / "videos" / n) for n in HELDOUT_VIDEOS if (root / "videos" / n).exists()]
    items = []
    for i in range(count):
        if i < len(real):
            media = real[i]
        elif rng.random() < 0.4:
            media = procedural_video(rng, [_skimage_photo("chelsea"), procedural_scene(rng)[0]])
        else:
            img = procedural_scene(rng)[0]
            media = Media(kind="image", frames=(img,), source="heldout", size=img.size)
        prompts = VIDEO_PROMPTS if media.kind == "video" else IMAGE_PROMPTS
        items.append(CorpusItem(f"heldout-{i:05d}", media, rng.choice(prompts[:2]), "heldout"))
    return items
