"""Where greedy FLASH and plain decoding part: the first differing token and the target's top-2 gap there.

Greedy FLASH must equal plain decoding token for token. When it does not, the report says where and
how close the target's two best tokens were at that point (by plain one-token decoding): a gap within
the dtype's rounding (:func:`near_tie_tolerance`) is a *near-tie* that a verification pass's different
rounding can flip; a larger one is a bug. The benchmark, the doctor and the race all report it this way.
"""

from __future__ import annotations

import torch

from flash.engine.config import GenerationConfig
from flash.targets.base import Prompt, TargetModel


def first_difference(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    """Index of the first differing token (or of the end of the shorter sequence), None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def near_tie_tolerance(top1: float, dtype: torch.dtype) -> float:
    """The logit gap a rounding difference can close at a top logit of ``top1`` in ``dtype``: two units of
    its relative precision at that size (bf16: 2^-7), and at least 1e-3 (the CPU tests' near-tie note,
    for float32 with fp16 weights)."""
    return max(1e-3, 2 * torch.finfo(dtype).eps * abs(top1))


@torch.inference_mode()
def top2_after(target: TargetModel, prompt: Prompt, prefix: tuple[int, ...],
               config: GenerationConfig) -> tuple[float, float]:
    """The target's two largest processed logits after ``prefix``, by plain one-token decoding."""
    pre = target.prefill(prompt)
    logits = pre.last_logits[None]
    for token in prefix:
        logits, _ = target.forward(pre.state, torch.tensor([[token]], device=target.device))
    top = config.rules.apply(logits[-1:].float(), list(prefix), len(prefix))[0].topk(2).values
    return float(top[0]), float(top[1])


def top2_gap(target: TargetModel, prompt: Prompt, prefix: tuple[int, ...], config: GenerationConfig) -> float:
    """Gap between the target's top-2 processed logits after ``prefix`` (plain one-token decoding)."""
    top1, top2 = top2_after(target, prompt, prefix, config)
    return top1 - top2
