"""Logits rules (repetition penalty, no-repeat-n-gram) applied identically by every decoding loop.

Speculative decoding stays lossless with such rules only if each verified position sees exactly
the prefix it would have had in plain decoding. :meth:`LogitsRules.apply` therefore takes a block
of logits and the generated tokens, and processes row ``j`` with the prefix ``generated[:start+j]``.
The rules see the *generated* tokens only (not the prompt), so words of the prompt such as the
class names of the default model are never penalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor


@dataclass(frozen=True)
class LogitsRules:
    """Generation rules; the defaults change nothing."""

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0")

    @property
    def active(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def processors(self) -> LogitsProcessorList:
        """The same rules as transformers logits processors (usable with ``generate()``)."""
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.no_repeat_ngram_size > 0:
            procs.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        return procs

    def apply(self, logits: torch.Tensor, generated: list[int], start: int) -> torch.Tensor:
        """Process ``logits`` [n, V]; row ``j`` is the next-token logits after ``generated[:start+j]``."""
        if not self.active:
            return logits
        procs = self.processors()
        rows = []
        for j in range(logits.shape[0]):
            prefix = torch.tensor([generated[: start + j]], dtype=torch.long)
            rows.append(procs(prefix, logits[j : j + 1].clone()))
        return torch.cat(rows, dim=0)
