"""LogitsRules.apply (one pass per block) equals transformers' own processors applied row by row."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flash.engine.logits_rules import LogitsRules


def reference(rules: LogitsRules, logits: torch.Tensor, generated: list[int], start: int) -> torch.Tensor:
    procs = rules.processors()
    rows = [procs(torch.tensor([generated[: start + j]], dtype=torch.long), logits[j : j + 1].clone())
            for j in range(logits.shape[0])]
    return torch.cat(rows)


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 7), min_size=0, max_size=30), n=st.integers(1, 6),
       penalty=st.sampled_from([1.0, 1.2, 0.8]), ngram=st.sampled_from([0, 1, 2, 3, 4]), seed=st.integers(0, 99))
def test_block_apply_equals_transformers_row_by_row(tokens, n, penalty, ngram, seed):
    rules = LogitsRules(repetition_penalty=penalty, no_repeat_ngram_size=ngram)
    # A tiny vocabulary makes repeated n-grams (the interesting case) common.
    generated = tokens + torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    start = len(tokens)
    logits = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(rules.apply(logits, generated, start), reference(rules, logits, generated, start))


def test_the_rules_really_act():
    """Guard against a vacuous comparison: the default target's rules change these logits."""
    rules = LogitsRules(repetition_penalty=1.2, no_repeat_ngram_size=3)
    logits = torch.ones(2, 8)
    out = rules.apply(logits, [1, 2, 3, 1, 2, 5], 5)
    assert out[0, 3] == float("-inf")  # "1 2 3" seen: after "1 2", 3 is banned
    assert out[1, 0] == 1.0 and out[1, 5] == 1.0 / 1.2  # 5 was generated (row 1's prefix), 0 never


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(st.integers(0, 11), min_size=0, max_size=30), ngram=st.sampled_from([0, 1, 2, 3]),
       seed=st.integers(0, 99))
def test_cursor_on_a_reduced_vocabulary_equals_the_full_row(tokens, ngram, seed):
    """A draft's row over a subset of the vocabulary gets exactly the full row's treatment on its columns."""
    rules = LogitsRules(repetition_penalty=1.2, no_repeat_ngram_size=ngram)
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(12, generator=g)[:7]  # reduced column j is token keep[j]
    column_of = torch.full((12,), -1, dtype=torch.long)
    column_of[keep] = torch.arange(7)
    full = torch.full((1, 12), float("-inf"))
    full[0, keep] = torch.randn(7, generator=g)
    want = rules.apply(full, tokens, len(tokens))[0, keep]
    got = rules.cursor(tokens).process_(full[0, keep].clone(), column_of)
    torch.testing.assert_close(got, want)


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, 9), min_size=0, max_size=25), paths=st.lists(
       st.lists(st.integers(0, 9), min_size=0, max_size=5), min_size=1, max_size=4),
       penalty=st.sampled_from([1.2, 0.8, 1.0]), ngram=st.sampled_from([0, 1, 2, 3, 4]), reduced=st.booleans(),
       seed=st.integers(0, 99))
def test_rows_for_many_paths_from_one_prefix_equal_a_cursor_per_path(tokens, paths, penalty, ngram, reduced, seed):
    """penalise_seen_ on all rows at once, then finish_after_ per row's path: bit for bit what a copy of
    the cursor pushed along that path makes of the row (draft trees and the verification walk rely on it)."""
    rules = LogitsRules(repetition_penalty=penalty, no_repeat_ngram_size=ngram)
    g = torch.Generator().manual_seed(seed)
    column_of = None
    width = 10
    if reduced:
        keep = torch.randperm(10, generator=g)[:6]
        column_of = torch.full((10,), -1, dtype=torch.long)
        column_of[keep] = torch.arange(6)
        width = 6
    rows = torch.randn(len(paths), width, generator=g)
    base = rules.cursor(tokens)
    got = base.penalise_seen_(rows.clone(), column_of)
    for r, path in enumerate(paths):
        base.finish_after_(got[r], path, column_of)
        cursor = rules.cursor(tokens + list(path))  # the reference: a cursor grown along the path
        assert sorted(base.banned_after(path)) == sorted(cursor.banned())
        assert torch.equal(got[r], cursor.process_(rows[r].clone(), column_of)), (r, path)
    assert base.tokens == tokens  # the base cursor itself never moved
