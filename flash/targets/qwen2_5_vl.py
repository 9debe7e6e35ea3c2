"""The Qwen2.5-VL target: ``Qwen2_5_VLForConditionalGeneration`` with its tokenizer and (PIL) image
processor.

Media spans: one per image; a video is one ``<|video_pad|>`` run that the model fills temporal patch
group by temporal patch group (``temporal_patch_size`` = 2 frames each), so it is cut into one span
per temporal group (``grid_t`` spans of ``grid_h * grid_w / merge**2`` tokens).

Videos are preprocessed here (PIL resize + the video processor's patch layout), not by
``Qwen2VLVideoProcessor``: that class needs torchvision, which this project does not ship.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flash.targets.base import Prompt, TargetState
from flash.targets.hf import HFTarget, carve_spans, fetch_pretrained, placeholder_runs, rgb_frames, to_device

#: Qwen2-VL / Qwen2.5-VL chat format, used when the tokenizer ships no chat template.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Where the Qwen video pixel budget lives in a checkpoint (the name transformers uses).
VIDEO_CONFIG_NAME = "video_preprocessor_config.json"

#: Token type ids get_rope_index expects: text 0, image 1, video 2.
_TEXT, _IMAGE, _VIDEO = 0, 1, 2


@dataclass(frozen=True)
class VideoPixels:
    """Qwen2.5-VL video inputs: flattened patches, the (t, h, w) grid and seconds per temporal group."""

    pixel_values_videos: torch.Tensor  # [t * h * w, C * temporal_patch * patch * patch]
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's resize rule: both sides multiples of ``factor``, area within bounds, aspect kept."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen25VLTarget(HFTarget):
    """``Qwen2_5_VLForConditionalGeneration`` with its tokenizer and (PIL) image processor.

    Rotary positions are computed here, never read from ``model.model.rope_deltas``: prefill gets
    the 3-D multimodal positions from ``get_rope_index`` and stores the rope delta in
    ``state.rope_offset``; every later token sits at ``cache position + rope_offset`` on all three
    axes, so positions stay right after ``crop``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        name: str,
        *,
        video_min_pixels: int = 128 * 28 * 28,
        video_max_pixels: int = 768 * 28 * 28,
        video_fps: float = 2.0,
        chat_template: str | None = None,
    ) -> None:
        super().__init__(model, tokenizer, name)
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or QWEN_CHAT_TEMPLATE
        self.video_min_pixels = video_min_pixels
        self.video_max_pixels = video_max_pixels
        self.video_fps = video_fps  # assumed frame rate when the media has no duration
        config = model.config
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = int(config.video_token_id)
        vision = config.vision_config
        self.patch_size = int(vision.patch_size)
        self.merge_size = int(vision.spatial_merge_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Weights, tokenizer, image processor and the video pixel budget."""
        super().save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        video = {
            "size": {"shortest_edge": self.video_min_pixels, "longest_edge": self.video_max_pixels},
            "fps": self.video_fps,
        }
        (Path(path) / VIDEO_CONFIG_NAME).write_text(json.dumps(video, indent=2) + "\n")

    # -- pixels -------------------------------------------------------------------------------

    def _normalise(self, frame: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """Resize (bicubic) and normalise one frame to a [C, H, W] float32 array."""
        height, width = size
        proc = self.image_processor
        arr = np.asarray(frame.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
        arr = arr * float(proc.rescale_factor)
        arr = (arr - np.asarray(proc.image_mean, np.float32)) / np.asarray(proc.image_std, np.float32)
        return arr.transpose(2, 0, 1)

    def video_pixels(self, frames: list[Image.Image], duration_s: float | None) -> VideoPixels:
        """Qwen2VLVideoProcessor's preprocessing, without torchvision (same patch layout)."""
        factor = self.patch_size * self.merge_size
        height, width = _smart_resize(
            frames[0].height, frames[0].width, factor, self.video_min_pixels, self.video_max_pixels
        )
        video = np.stack([self._normalise(f, (height, width)) for f in frames])  # [T, C, H, W]
        tp, ps, ms = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -len(video) % tp:  # repeat the last frame, as the video processor does
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        num_frames, channels = video.shape[:2]
        gt, gh, gw = num_frames // tp, height // ps, width // ps
        patches = video.reshape(gt, tp, channels, gh // ms, ms, ps, gw // ms, ms, ps)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = patches.reshape(gt * gh * gw, channels * tp * ps * ps)
        fps = len(frames) / duration_s if duration_s else self.video_fps
        return VideoPixels(torch.from_numpy(np.ascontiguousarray(flat)), (gt, gh, gw), tp / fps)

    # -- prompt -------------------------------------------------------------------------------

    def build_prompt(self, media: Any, text: str) -> Prompt:
        """Chat-template ``text`` with an image or video entry; expand the pad tokens and tokenize."""
        kind = getattr(media, "kind", None) if media is not None else None
        content: list[dict[str, Any]] = [{"type": kind}] if kind else []
        messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
        rendered = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, chat_template=self.chat_template
        )
        payload: dict[str, Any] = {}
        sizes: list[int] = []
        expanded = rendered
        unit = self.merge_size**2
        if kind == "image":
            batch = self.image_processor(images=rgb_frames(media)[:1], return_tensors="pt")
            grid = batch["image_grid_thw"].long()
            payload = {"pixel_values": batch["pixel_values"], "image_grid_thw": grid}
            sizes = [int(grid[0].prod()) // unit]
            expanded = rendered.replace("<|image_pad|>", "<|image_pad|>" * sizes[0], 1)
        elif kind == "video":
            vid = self.video_pixels(rgb_frames(media), getattr(media, "duration_s", None))
            gt, gh, gw = vid.grid_thw
            payload = {
                "pixel_values_videos": vid.pixel_values_videos,
                "video_grid_thw": torch.tensor([vid.grid_thw], dtype=torch.long),
                "second_per_grid_ts": torch.tensor([vid.second_per_grid_t], dtype=torch.float32),
            }
            sizes = [gh * gw // unit] * gt  # one span per temporal patch group
            expanded = rendered.replace("<|video_pad|>", "<|video_pad|>" * sum(sizes), 1)
        encoded = self.tokenizer(expanded, add_special_tokens=False, return_tensors="pt")
        input_ids = encoded["input_ids"].long()
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == self.image_token_id] = _IMAGE
        types[input_ids == self.video_token_id] = _VIDEO
        spans: tuple[tuple[int, int], ...] = ()
        if kind:
            token = self.image_token_id if kind == "image" else self.video_token_id
            spans = carve_spans(placeholder_runs(input_ids[0], token), sizes)
        if payload:
            payload["mm_token_type_ids"] = types
        return Prompt(input_ids=input_ids, media_spans=spans, media_payload=payload, text=rendered)

    # -- positions ----------------------------------------------------------------------------

    def _prefill_positions(self, prompt: Prompt) -> tuple[torch.Tensor | None, int]:
        """3-D multimodal positions [3, 1, L] of the prompt and its rope delta."""
        payload = prompt.media_payload or {}
        if "mm_token_type_ids" not in payload:  # text only: plain positions
            positions = torch.arange(prompt.length, device=self.device).view(1, 1, -1).expand(3, 1, -1)
            return positions, 0
        keys = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
        inputs = to_device({k: payload[k] for k in keys if k in payload}, self.device)
        positions, deltas = self.model.model.get_rope_index(
            prompt.input_ids.to(self.device),
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
        )
        return positions, int(deltas.reshape(-1)[0])

    def _positions(self, state: TargetState, n: int, cache_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Positions [3, 1, n] of new text tokens: cache position + rope delta on every axis."""
        return super()._positions(state, n, cache_positions).view(1, 1, n).expand(3, 1, n)


def load_qwen2_5_vl(model_id: str, name: str, kwargs: dict[str, Any]) -> Qwen25VLTarget:
    """A Qwen2.5-VL checkpoint with its tokenizer, image processor and video settings; ``kwargs`` go to
    ``from_pretrained`` (dtype, device map...)."""
    # Not AutoProcessor: its video processor needs torchvision; videos are preprocessed here.
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
    )

    tokenizer = fetch_pretrained(AutoTokenizer.from_pretrained, model_id)
    image_processor = fetch_pretrained(AutoImageProcessor.from_pretrained, model_id)
    model = fetch_pretrained(Qwen2_5_VLForConditionalGeneration.from_pretrained, model_id, **kwargs)
    return Qwen25VLTarget(model.eval(), tokenizer, image_processor, name, **_video_settings(model_id))


def _video_settings(model_id: str) -> dict[str, Any]:
    """Video pixel budget and frame rate from the checkpoint's video preprocessor config, if any."""
    from transformers.utils import cached_file

    def locate(repo: str, **kwargs: Any) -> str | None:
        return cached_file(repo, VIDEO_CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **kwargs)

    try:
        path = fetch_pretrained(locate, model_id)
    except OSError:
        path = None
    if path is None:
        return {}
    raw = json.loads(Path(path).read_text())
    size = raw.get("size") or {}
    settings = {
        "video_min_pixels": raw.get("min_pixels") or size.get("shortest_edge"),
        "video_max_pixels": raw.get("max_pixels") or size.get("longest_edge"),
        "video_fps": raw.get("fps"),
    }
    return {key: value for key, value in settings.items() if value}
