"""The target-model interface every decoding loop uses.

A target adapter turns (media, prompt text) into a :class:`Prompt`, prefills it, runs forwards over
a few new tokens against its KV cache, and crops that cache back. All decoding state lives in one
small :class:`TargetState` owned by the caller, so the loops read top to bottom with no hidden
mutable state in the model.

Vocabulary (FLASH.md): ``h_t`` is the last-layer hidden state *after* the final norm at position
``t`` (``lm_head(h_t)`` gives the logits for token ``t+1``); ``e_t`` is the input embedding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from flash.engine.logits_rules import LogitsRules


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt for one target.

    ``input_ids`` holds a placeholder id at every media position; ``media_spans`` lists the
    ``[start, end)`` range of each media span (one per image, one per video frame) in order.
    ``media_payload`` is private to the adapter that built it (pixel values, visual embeddings).
    """

    input_ids: torch.Tensor  # [1, L] long
    media_spans: tuple[tuple[int, int], ...]
    media_payload: Any = None
    text: str = ""  # the rendered chat text, for display and debugging

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class TargetState:
    """Decoding state of one request: the KV cache and how many positions it holds.

    ``rope_offset`` is the gap between cache positions and rotary positions after the prompt
    (non-zero for Qwen2.5-VL's multimodal RoPE; 0 elsewhere).
    """

    cache: Any
    length: int
    rope_offset: int = 0


@dataclass(frozen=True)
class PrefillOutput:
    """What a prefill returns: the new state, the logits for the first new token, and ``h``."""

    state: TargetState
    last_logits: torch.Tensor  # [vocab] float32: logits for the token after the prompt
    hidden: torch.Tensor  # [L, D]: h_0 .. h_{L-1} over the whole prompt (media positions too)


class TargetModel(ABC):
    """One target LMM behind the small interface the decoding loops use."""

    #: Stable identity of the weights; drafts record it and refuse other targets.
    name: str
    eos_token_ids: frozenset[int]
    hidden_size: int
    vocab_size: int

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @abstractmethod
    def build_prompt(self, media: Any, text: str) -> Prompt:
        """Render ``text`` (and ``media``: a :class:`flash.media.Media` or ``None``) as a Prompt."""

    @abstractmethod
    def prefill(self, prompt: Prompt) -> PrefillOutput:
        """Run the whole prompt through the target with a fresh cache."""

    @abstractmethod
    def forward(self, state: TargetState, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``token_ids`` ([1, n]) to the cache; return (logits [n, V] float32, h [n, D])."""

    def crop(self, state: TargetState, length: int) -> None:
        """Drop cache entries past ``length`` (rejected draft tokens)."""
        if length < state.length:
            state.cache.crop(length - state.length)  # transformers 5 takes a negative count
            state.length = length

    #: Whether :meth:`forward_tree` works (tree drafts need an explicit mask and positions).
    supports_tree: bool = False

    def forward_tree(self, state: TargetState, token_ids: torch.Tensor, mask: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``token_ids`` [1, n] laid out as a tree (:func:`flash.engine.tree.tree_attention`): row i
        attends where ``mask[i]`` ([n, state.length + n]) is True, at position ``positions[i]``.
        Returns (logits [n, V] float32, h [n, D]); :meth:`keep` then drops the rejected branches."""
        raise NotImplementedError(f"{type(self).__name__} does not verify draft trees")

    @torch.inference_mode()  # the cache holds inference tensors: only inference mode may write them
    def keep(self, state: TargetState, start: int, offsets: list[int]) -> None:
        """Keep cache positions ``start + offsets`` (in order) at ``start..`` and drop the rest after ``start``."""
        from flash.targets.kv_cache import keep_positions

        keep_positions(state.cache, start, offsets)
        state.length = start + len(offsets)

    @abstractmethod
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The target's (frozen) input embeddings ``e`` of ``token_ids`` ([..., n] -> [..., n, D])."""

    @abstractmethod
    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's (frozen) LM head: h [..., D] -> logits [..., V]."""

    def lm_head_weight(self) -> torch.Tensor:
        """The LM head as a [V, D] matrix (drafts slice it for a reduced vocabulary)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its LM head weight")

    @abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """Token ids -> text (special tokens skipped)."""

    def default_prompt(self, media: Any) -> str:
        """The prompt used when the user gives none."""
        if media is not None and getattr(media, "kind", "image") == "video":
            return "Describe what happens in this video."
        return "Describe this image in detail."

    def logits_rules(self) -> LogitsRules:
        """Generation rules (repetition penalty, n-gram ban) this target decodes with by default."""
        from flash.engine.logits_rules import LogitsRules

        return LogitsRules()
