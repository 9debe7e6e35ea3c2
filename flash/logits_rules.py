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

    def _penalise(self, values: torch.Tensor) -> torch.Tensor:
        return torch.where(values < 0, values * self.repetition_penalty, values / self.repetition_penalty)

    def apply(self, logits: torch.Tensor, generated: list[int], start: int) -> torch.Tensor:
        """Process ``logits`` [n, V]; row ``j`` is the next-token logits after ``generated[:start+j]``.

        Same result as :meth:`processors` row by row (tested), but one pass for the whole block:
        this runs on every verification and for every draft row, so it must not cost a Python
        walk over the prefix per row (measured: 3.9 ms for 5 rows that way, on the step's path).
        """
        if not self.active:
            return logits
        n, out = logits.shape[0], logits.clone()
        if self.repetition_penalty != 1.0:
            # Touch only the columns of tokens already generated (a few dozen), never the whole vocabulary.
            seen = sorted(set(generated[:start]))
            if seen:
                out[:, seen] = self._penalise(out[:, seen])
            seen = set(seen)
            for j in range(1, n):  # row j (and later rows) also saw the block's token j-1
                token = generated[start + j - 1]
                if token not in seen:
                    seen.add(token)
                    out[j:, token] = self._penalise(out[j:, token])
        if self.no_repeat_ngram_size > 0:
            for j, banned in enumerate(self.ngram_bans(generated, range(start, start + n))):
                if banned:
                    out[j, banned] = float("-inf")
        return out

    def ngram_bans(self, generated: list[int], lengths: range) -> list[list[int]]:
        """For each prefix length in ``lengths`` (increasing): the tokens the no-repeat-n-gram rule
        bans after ``generated[:length]`` (one incremental walk over the prefix)."""
        size, out = self.no_repeat_ngram_size, []
        if size <= 0:
            return [[] for _ in lengths]
        followers: dict[tuple[int, ...], list[int]] = {}
        i = 0
        for length in lengths:
            while i + size - 1 < length:  # every n-gram that ends inside the prefix
                followers.setdefault(tuple(generated[i : i + size - 1]), []).append(generated[i + size - 1])
                i += 1
            key = tuple(generated[length - size + 1 : length])  # the last n-1 tokens
            out.append(list(followers.get(key, ())) if length + 1 >= size else [])
        return out
