"""The target's own token from its processed logits: the one choice every loop, the embedded model's
batched decoding and distillation make, so all of them pick the same token."""

from __future__ import annotations

import torch

from flash.engine.config import GenerationConfig
from flash.engine.verification import logits_to_probs, sample


def choose_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator) -> int:
    """The target's own next token from processed logits [V]."""
    if config.greedy:
        return int(logits.argmax())
    return int(sample(logits_to_probs(logits, config.temperature, config.top_p), generator))
