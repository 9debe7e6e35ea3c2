"""Hugging Face target adapters: LLaVA (1.5-style) and Qwen2.5-VL behind :class:`TargetModel`.

Each adapter owns a ``*ForConditionalGeneration`` model plus what it needs to tokenize prompts, and
exposes prefill / forward / crop against a KV cache (``flash.targets.kv_cache``) held in the caller's
:class:`TargetState`. Hidden states come from ``model.model`` (the base model, whose
``last_hidden_state`` is already after the final norm), logits from ``model.lm_head``.

Media spans:

* LLaVA: one span per image; a video is fed as its frames, one ``<image>`` per frame, so one span
  per frame.
* Qwen2.5-VL: one span per image; a video is one ``<|video_pad|>`` run that the model fills
  temporal patch group by temporal patch group (``temporal_patch_size`` = 2 frames each), so it is
  cut into one span per temporal group (``grid_t`` spans of ``grid_h * grid_w / merge**2`` tokens).

Qwen2.5-VL videos are preprocessed here (PIL resize + the video processor's patch layout), not by
``Qwen2VLVideoProcessor``: that class needs torchvision, which this project does not ship.

``tiny_llava`` / ``tiny_qwen2_5_vl`` build small random models with local tokenizers (no network)
for tests and docs.

Every model call runs under ``torch.inference_mode()``, so returned tensors (``hidden``, logits) are
inference tensors: ``.clone()`` them outside inference mode before feeding them to anything that
needs autograd (e.g. training a draft on ``h``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flash.targets.base import PrefillOutput, Prompt, TargetModel, TargetState
from flash.targets.kv_cache import in_place_cache

__all__ = [
    "TREE_ATTENTION",
    "LlavaTarget",
    "Qwen25VLTarget",
    "TargetLoadError",
    "load_hf_target",
    "tiny_llava",
    "tiny_qwen2_5_vl",
]


class TargetLoadError(RuntimeError):
    """A target model could not be loaded (missing weights, unsupported architecture)."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _runs(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` runs of ``token_id`` in a 1-D id tensor."""
    mask = (ids == token_id).tolist()
    runs: list[tuple[int, int]] = []
    start = None
    for i, hit in enumerate(mask + [False]):
        if hit and start is None:
            start = i
        elif not hit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _carve(runs: list[tuple[int, int]], sizes: list[int]) -> tuple[tuple[int, int], ...]:
    """Cut placeholder runs into consecutive spans of the given sizes.

    Templates may put several media placeholders back to back, which merges their runs; the
    per-media token counts recover the boundaries.
    """
    spans: list[tuple[int, int]] = []
    queue = list(sizes)
    for start, end in runs:
        pos = start
        while pos < end:
            if not queue:
                raise ValueError(f"more placeholder tokens than media expects (runs {runs}, sizes {sizes})")
            size = queue.pop(0)
            if pos + size > end:
                raise ValueError(f"a {size}-token span crosses a run boundary (runs {runs}, sizes {sizes})")
            spans.append((pos, pos + size))
            pos += size
    if queue:
        raise ValueError(f"fewer placeholder tokens than media expects (runs {runs}, sizes {sizes})")
    return tuple(spans)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    sources = [
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config.get_text_config(), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ]
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _frames(media: Any) -> list[Image.Image]:
    """The RGB frames of a :class:`flash.media.Media` (one for an image)."""
    return [frame.convert("RGB") for frame in media.frames]


def _execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes. With accelerate's CPU/disk offload its weights sit on the meta
    device and its hook moves them in for each call: the hook's execution device is the answer."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return module.weight.device


def _real_weight(module: torch.nn.Module) -> torch.Tensor:
    """``module.weight``, fetched from accelerate's offload map when it is only a meta placeholder."""
    weight = module.weight
    if weight.device.type == "meta":
        weight = module._hf_hook.weights_map["weight"]
    return weight.detach().to(_execution_device(module))


def _to_device(payload: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a kwargs dict to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in payload.items()}


def _config_name(prefix: str, config: Any, seed: int) -> str:
    """A stable name for a random model: its config and seed fully determine its weights."""
    digest = hashlib.sha1(f"{config.to_json_string(use_diff=False)}|{seed}".encode()).hexdigest()
    return f"{prefix}-{digest[:12]}"


#: Attention implementations that add a 4D mask to their scores, so a draft tree verifies exactly.
#: flash-attention takes no mask (only causal or padding), so flash-attention targets verify chains.
TREE_ATTENTION = ("sdpa", "eager")


class _HFTarget(TargetModel):
    """What the LLaVA and Qwen2.5-VL adapters share: cache handling, heads, decoding."""

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        text_config = model.config.get_text_config()
        self.hidden_size = int(text_config.hidden_size)
        self.vocab_size = int(text_config.vocab_size)
        self.eos_token_ids = _eos_ids(model, tokenizer)

    # -- properties ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings: where inputs go (the model may be split or offloaded)."""
        return _execution_device(self.model.get_input_embeddings())

    @property
    def dtype(self) -> torch.dtype:
        """Weight dtype (bf16 on CUDA, float32 on CPU by default)."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def output_device(self) -> torch.device:
        """Where logits and ``h`` come back: the LM head's device (the last one when the model is split
        over devices by ``device_map="auto"``; the decoding loops move what the draft needs from here)."""
        return _execution_device(self.model.lm_head)

    @property
    def attn_implementation(self) -> str:
        """The language model's attention implementation (``sdpa``, ``eager``, ``flash_attention_2``...)."""
        return str(self.model.config.get_text_config()._attn_implementation)

    # -- hooks the subclasses fill in ---------------------------------------------------------

    def model_inputs(self, prompt: Prompt) -> dict[str, Any]:
        """Keyword arguments for ``model(...)`` / ``model.generate(...)`` for this prompt."""
        return {"input_ids": prompt.input_ids, **(prompt.media_payload or {})}

    def _prefill_positions(self, prompt: Prompt) -> tuple[torch.Tensor | None, int]:
        """Rotary positions of the whole prompt (``None``: the model's default) and the rope offset."""
        return None, 0

    def _positions(self, state: TargetState, n: int, cache_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Explicit positions of ``n`` new tokens appended at cache position ``state.length`` (or at
        ``cache_positions`` [n], a draft tree's)."""
        if cache_positions is None:
            cache_positions = torch.arange(state.length, state.length + n, device=self.device)
        return (cache_positions.to(self.device) + state.rope_offset).unsqueeze(0)

    # -- TargetModel ---------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, prompt: Prompt) -> PrefillOutput:
        """Run the prompt (with its pixels) through the base model with a fresh cache."""
        inputs = _to_device(self.model_inputs(prompt), self.device)
        inputs.pop("attention_mask", None)  # single unpadded sequence: plain causal mask
        positions, rope_offset = self._prefill_positions(prompt)
        cache = in_place_cache(self.model.config)  # appends and crops without copying the cache
        out = self.model.model(**inputs, position_ids=positions, past_key_values=cache, use_cache=True)
        last_logits = self.lm_head(out.last_hidden_state[0, -1]).float()
        hidden = out.last_hidden_state[0].to(last_logits.device)  # both on the output device
        state = TargetState(cache=out.past_key_values, length=prompt.length, rope_offset=rope_offset)
        return PrefillOutput(state=state, last_logits=last_logits, hidden=hidden)

    @torch.inference_mode()
    def forward(self, state: TargetState, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``token_ids`` ([1, n]) at ``state.length``; return (logits [n, V] fp32, h [n, D])."""
        return self._append(state, token_ids, self._positions(state, int(token_ids.shape[1])), None)

    @property
    def supports_tree(self) -> bool:
        """Whether a tree pass is exact here: only attention that adds a 4D mask to its scores takes one."""
        return self.attn_implementation in TREE_ATTENTION

    @torch.inference_mode()
    def forward_tree(self, state: TargetState, token_ids: torch.Tensor, mask: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over a draft tree laid out by :func:`flash.engine.tree.tree_attention` (see TargetModel)."""
        if not self.supports_tree:
            raise ValueError(f"{self.name} runs {self.attn_implementation} attention, which takes no tree mask: "
                             "verify chains (method 'flash') or load it with attn_implementation='sdpa'")
        return self._append(state, token_ids, self._positions(state, int(token_ids.shape[1]), positions),
                            self._tree_mask(mask))

    def _tree_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Boolean tree mask [n, L] (True = may attend) -> additive [1, 1, n, L]: 0 / -inf in the model dtype.

        transformers hands a 4D mask to the attention function unchanged, and eager attention *adds*
        it to the scores: a boolean one would add 1 / 0 and mask nothing. SDPA adds a float mask the
        same way, so one additive mask serves both.
        """
        additive = torch.zeros(mask.shape, dtype=self.dtype, device=self.device)
        return additive.masked_fill_(~mask.to(self.device), float("-inf"))[None, None]

    def _append(self, state: TargetState, token_ids: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.model(
            input_ids=token_ids.to(self.device),
            position_ids=position_ids,
            attention_mask=mask,
            past_key_values=state.cache,
            use_cache=True,
        )
        state.cache = out.past_key_values
        state.length += int(token_ids.shape[1])
        logits = self.lm_head(out.last_hidden_state[0]).float()
        return logits, out.last_hidden_state[0].to(logits.device)  # both on the output device

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``token_ids`` ([..., n] -> [..., n, D])."""
        return self.model.get_input_embeddings()(token_ids.to(self.device))

    @torch.inference_mode()
    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: h [..., D] -> logits [..., V] (in the model dtype)."""
        head = self.model.lm_head
        return head(hidden.to(_execution_device(head), head.weight.dtype))

    def lm_head_weight(self) -> torch.Tensor:
        return _real_weight(self.model.lm_head)

    def decode(self, token_ids: list[int]) -> str:
        """Token ids -> text, special tokens skipped."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write weights and preprocessing files that :func:`load_hf_target` reads back."""
        self.model.save_pretrained(path)


# --------------------------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------------------------

#: LLaVA-1.5 conversation format, used when the processor ships no chat template.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class LlavaTarget(_HFTarget):
    """``LlavaForConditionalGeneration`` + ``LlavaProcessor``. Videos go in as one image per frame."""

    def __init__(self, model: Any, processor: Any, name: str) -> None:
        super().__init__(model, processor.tokenizer, name)
        self.processor = processor
        self.image_token_id = int(model.config.image_token_id)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Weights plus the processor (tokenizer, image processor, chat template)."""
        super().save_pretrained(path)
        self.processor.save_pretrained(path)

    def build_prompt(self, media: Any, text: str) -> Prompt:
        """Chat-template ``text`` with one image entry per frame; expand and tokenize via the processor."""
        frames = _frames(media) if media is not None else []
        content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        template = None if getattr(self.processor, "chat_template", None) else LLAVA_CHAT_TEMPLATE
        rendered = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, chat_template=template
        )
        batch = self.processor(text=rendered, images=frames or None, return_tensors="pt")
        input_ids = batch["input_ids"].long()
        # Everything but the ids goes to the model (pixel_values, and image_sizes where produced).
        payload = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        spans: tuple[tuple[int, int], ...] = ()
        if frames:
            runs = _runs(input_ids[0], self.image_token_id)
            total = sum(end - start for start, end in runs)
            # LLaVA-1.5 crops every image to the same size, so every frame gets the same count.
            spans = _carve(runs, [total // len(frames)] * len(frames))
        return Prompt(input_ids=input_ids, media_spans=spans, media_payload=payload, text=rendered)


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL
# --------------------------------------------------------------------------------------------

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


class Qwen25VLTarget(_HFTarget):
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
            batch = self.image_processor(images=_frames(media)[:1], return_tensors="pt")
            grid = batch["image_grid_thw"].long()
            payload = {"pixel_values": batch["pixel_values"], "image_grid_thw": grid}
            sizes = [int(grid[0].prod()) // unit]
            expanded = rendered.replace("<|image_pad|>", "<|image_pad|>" * sizes[0], 1)
        elif kind == "video":
            vid = self.video_pixels(_frames(media), getattr(media, "duration_s", None))
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
            spans = _carve(_runs(input_ids[0], token), sizes)
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
        inputs = _to_device({k: payload[k] for k in keys if k in payload}, self.device)
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


# --------------------------------------------------------------------------------------------
# Loading from the hub
# --------------------------------------------------------------------------------------------


def _not_available(model_id: str, err: Exception) -> TargetLoadError:
    return TargetLoadError(
        f"model {model_id!r} is not available offline: download it first with "
        f"`hf download {model_id}` or set HF_HOME to a cache that holds it ({type(err).__name__})"
    )


def _fetch(load: Any, model_id: str, **kwargs: Any) -> Any:
    """``load(model_id)`` from the local cache first, then (unless HF_HUB_OFFLINE) from the hub.

    Cache first so that a machine without network fails or succeeds at once instead of
    retrying hub requests.
    """
    try:
        return load(model_id, local_files_only=True, **kwargs)
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise
    return load(model_id, **kwargs)


def load_hf_target(
    model_id: str, *, device_map: Any = "auto", dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> TargetModel:
    """Load a LLaVA or Qwen2.5-VL checkpoint (hub id or local dir) as a :class:`TargetModel`.

    ``dtype`` defaults to bf16 on CUDA and float32 on CPU. ``device_map`` is passed to accelerate
    on CUDA (one or several GPUs); on a CPU-only machine the model loads plainly on the CPU.
    ``attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``...) defaults to transformers'
    choice; draft trees verify on ``sdpa`` and ``eager`` (:data:`TREE_ATTENTION`), chains on all.
    Raises :class:`TargetLoadError` when the weights are missing or the architecture unsupported.
    """
    from transformers import AutoConfig, LlavaConfig, Qwen2_5_VLConfig

    try:
        config = _fetch(AutoConfig.from_pretrained, model_id)
    except (OSError, ValueError) as err:
        raise _not_available(model_id, err) from err
    cuda = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map if cuda else None}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    name = model_id.rstrip("/")
    try:
        if isinstance(config, LlavaConfig):
            return _load_llava(model_id, name, kwargs)
        if isinstance(config, Qwen2_5_VLConfig):
            return _load_qwen(model_id, name, kwargs)
    except OSError as err:
        raise _not_available(model_id, err) from err
    except (ImportError, ValueError) as err:  # e.g. flash_attention_2 asked for without flash-attn installed
        raise TargetLoadError(f"cannot load {model_id!r}: {' '.join(str(err).split())}") from err
    kind = type(config).__name__
    raise TargetLoadError(f"model {model_id!r} is a {kind}: only LLaVA and Qwen2.5-VL are supported")


def _load_llava(model_id: str, name: str, kwargs: dict[str, Any]) -> LlavaTarget:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = _fetch(AutoProcessor.from_pretrained, model_id)
    model = _fetch(LlavaForConditionalGeneration.from_pretrained, model_id, **kwargs)
    return LlavaTarget(model.eval(), processor, name)


def _load_qwen(model_id: str, name: str, kwargs: dict[str, Any]) -> Qwen25VLTarget:
    # Not AutoProcessor: its video processor needs torchvision; videos are preprocessed here.
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
    )

    tokenizer = _fetch(AutoTokenizer.from_pretrained, model_id)
    image_processor = _fetch(AutoImageProcessor.from_pretrained, model_id)
    model = _fetch(Qwen2_5_VLForConditionalGeneration.from_pretrained, model_id, **kwargs)
    return Qwen25VLTarget(model.eval(), tokenizer, image_processor, name, **_video_settings(model_id))


def _video_settings(model_id: str) -> dict[str, Any]:
    """Video pixel budget and frame rate from the checkpoint's video preprocessor config, if any."""
    from transformers.utils import cached_file

    def locate(repo: str, **kwargs: Any) -> str | None:
        return cached_file(repo, VIDEO_CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **kwargs)

    try:
        path = _fetch(locate, model_id)
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


# --------------------------------------------------------------------------------------------
# Tiny random models (tests, docs)
# --------------------------------------------------------------------------------------------

_WORDS = [
    "the", "a", "an", "is", "are", "was", "of", "and", "to", "in", "on", "at", "with", "for", "it",
    "this", "that", "there", "image", "video", "picture", "photo", "shows", "show", "describe",
    "what", "happens", "detail", "details", "cat", "dog", "bird", "horse", "person", "man", "woman",
    "child", "people", "car", "road", "street", "tree", "trees", "sky", "sun", "cloud", "water",
    "sea", "river", "house", "building", "room", "table", "chair", "window", "red", "blue", "green",
    "yellow", "white", "black", "brown", "small", "large", "big", "old", "young", "left", "right",
    "top", "bottom", "front", "behind", "near", "next", "standing", "sitting", "walking", "running",
    "looking", "holding", "wearing", "playing", "background", "foreground", "scene", "frame",
    "frames", "moves", "moving", "then", "first", "next", "finally", "one", "two", "three", "many",
    "some",
]  # fmt: skip
_PUNCT = [".", ",", ":", "!", "?", "'", "-", "(", ")"]
_TINY_VOCAB = 384  # tokenizer vocabulary = model vocabulary, padded with filler words


def _tiny_tokenizer(special: list[str], chat_template: str, eos: str) -> Any:
    """A word-level fast tokenizer over a fixed vocabulary, with ``special`` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<unk>", "<pad>", *special]
    vocab: dict[str, int] = {}
    template_words = ["USER", "ASSISTANT", "system", "user", "assistant", "You", "helpful"]
    for word in base + template_words + _WORDS + _PUNCT:
        vocab.setdefault(word, len(vocab))
    for i in range(len(vocab), _TINY_VOCAB):
        vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token=eos,
        additional_special_tokens=special,
        chat_template=chat_template,
    )


def _seeded(seed: int, build: Any) -> Any:
    """Build a model with torch's global RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa") -> LlavaTarget:
    """A tiny random LLaVA (CLIP 56 px / 14 px patches -> 16 tokens per image, Llama 64-d x 2).

    ``attn_implementation`` does not change the weights (nor the name, which names the weights)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _tiny_tokenizer(["<s>", "</s>", "<image>"], LLAVA_CHAT_TEMPLATE, eos="</s>")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    eos_id = tokenizer.eos_token_id
    text = LlamaConfig(
        vocab_size=_TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.1,  # larger than the default 0.02: less degenerate, position-sensitive
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.convert_tokens_to_ids("<s>"),
        eos_token_id=eos_id,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=56, patch_size=14, projection_dim=32,
    )  # fmt: skip
    config = LlavaConfig(
        text_config=text, vision_config=vision, image_token_id=image_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    model = _seeded(seed, lambda: LlavaForConditionalGeneration(config))
    model.set_attn_implementation(attn_implementation)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip
    return LlavaTarget(model, processor, _config_name("llava-tiny", config, seed))


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa") -> Qwen25VLTarget:
    """A tiny random Qwen2.5-VL (2-layer 32-d vision tower, 64-d x 2 text model, small pixel budgets).

    ``attn_implementation`` does not change the weights (nor the name, which names the weights)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
    tokenizer = _tiny_tokenizer(special, QWEN_CHAT_TEMPLATE, eos="<|im_end|>")
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in special}
    eos_id = ids["<|im_end|>"]
    text = {
        "vocab_size": _TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "initializer_range": 0.1,  # larger than the default: the test models react to wrong positions
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": eos_id, "pad_token_id": tokenizer.pad_token_id,
    }  # fmt: skip
    vision = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 4, "window_size": 56,
        "out_hidden_size": 64, "fullatt_block_indexes": [1],
    }  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    model = _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config))
    model.set_attn_implementation(attn_implementation)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return Qwen25VLTarget(
        model, tokenizer, image_processor, _config_name("qwen2.5-vl-tiny", config, seed),
        video_min_pixels=56 * 56, video_max_pixels=84 * 84, chat_template=QWEN_CHAT_TEMPLATE,
    )  # fmt: skip
