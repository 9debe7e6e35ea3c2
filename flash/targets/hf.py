"""What the Hugging Face target adapters share (:class:`HFTarget`): prefill / forward / crop against a
KV cache (:mod:`flash.targets.kv_cache`) held in the caller's :class:`~flash.targets.base.TargetState`,
the frozen embeddings and LM head, tree passes, and the helpers the model families use.

Each adapter (one per file: :mod:`flash.targets.llava`, :mod:`flash.targets.qwen2_5_vl`) owns a
``*ForConditionalGeneration`` model plus what it needs to tokenize prompts. Hidden states come from
``model.model`` (the base model, whose ``last_hidden_state`` is already after the final norm), logits
from ``model.lm_head``. :func:`flash.targets.hub.load_hf_target` loads a checkpoint as the right one;
:mod:`flash.targets.tiny` builds tiny random ones for tests.

Every model call runs under ``torch.inference_mode()``, so returned tensors (``hidden``, logits) are
inference tensors: ``.clone()`` them outside inference mode before feeding them to anything that
needs autograd (e.g. training a draft on ``h``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image

from flash.targets.base import PrefillOutput, Prompt, TargetModel, TargetState
from flash.targets.kv_cache import in_place_cache


def placeholder_runs(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
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


def carve_spans(runs: list[tuple[int, int]], sizes: list[int]) -> tuple[tuple[int, int], ...]:
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


def rgb_frames(media: Any) -> list[Image.Image]:
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


def to_device(payload: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a kwargs dict to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in payload.items()}


#: Attention implementations that add a 4D mask to their scores, so a draft tree verifies exactly.
#: flash-attention takes no mask (only causal or padding), so flash-attention targets verify chains.
TREE_ATTENTION = ("sdpa", "eager")


class HFTarget(TargetModel):
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
        inputs = to_device(self.model_inputs(prompt), self.device)
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
        """Write weights and preprocessing files that :func:`flash.targets.hub.load_hf_target` reads back."""
        self.model.save_pretrained(path)


def fetch_pretrained(load: Any, model_id: str, **kwargs: Any) -> Any:
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
