"""The pure acceptance math of flash/engine/verification.py: hand-built logits, properties, statistics.

Names follow verification.py: ``target_*`` is the paper's p, ``draft_*`` its q (Leviathan et al.
2023, Algorithm 1). The statistical tests are seeded, so they are deterministic; their bounds are
a few times the sampling error expected at their sample sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flash.engine.verification import (
    draw_siblings,
    greedy_verify,
    logits_to_probs,
    sample,
    sampling_verify,
    sibling_verify,
)

NEG_INF = float("-inf")


def one_hot_logits(tokens: list[int], vocab: int, high: float = 10.0, low: float = -10.0) -> torch.Tensor:
    """Logits [len(tokens), vocab]: ``high`` at each row's token, ``low`` elsewhere."""
    logits = torch.full((len(tokens), vocab), low)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = high
    return logits


# --- greedy_verify ------------------------------------------------------------------------------


def test_greedy_all_accepted_gives_bonus_from_last_row():
    target_logits = one_hot_logits([3, 1, 4, 2], vocab=6)  # rows check d_1..d_3, row 3 is the bonus
    accepted, next_token = greedy_verify(torch.tensor([3, 1, 4]), target_logits)
    assert (accepted, next_token) == (3, 2)


@pytest.mark.parametrize("mismatch", [0, 1, 2])
def test_greedy_first_mismatch_stops_and_gives_target_token(mismatch):
    target_tokens = [3, 1, 4, 2]
    draft = [3, 1, 4]
    draft[mismatch] = 5
    accepted, next_token = greedy_verify(torch.tensor(draft), one_hot_logits(target_tokens, vocab=6))
    assert accepted == mismatch
    assert next_token == target_tokens[mismatch]  # the target's own token replaces the wrong draft


def test_greedy_later_matches_after_a_mismatch_do_not_count():
    accepted, next_token = greedy_verify(torch.tensor([0, 1, 4]), one_hot_logits([5, 1, 4, 2], vocab=6))
    assert (accepted, next_token) == (0, 5)


def test_greedy_k0_returns_argmax_of_the_only_row():
    target_logits = torch.tensor([[NEG_INF, -10.0, 10.0, NEG_INF]])
    accepted, next_token = greedy_verify(torch.empty(0, dtype=torch.long), target_logits)
    assert (accepted, next_token) == (0, 2)


def test_greedy_ignores_neg_inf_rows_elsewhere():
    target_logits = torch.tensor([[10.0, NEG_INF, -10.0], [NEG_INF, NEG_INF, 10.0]])
    assert greedy_verify(torch.tensor([0]), target_logits) == (1, 2)


@settings(max_examples=200, deadline=None, database=None)
@given(st.data())
def test_greedy_verify_is_longest_matching_prefix(data):
    vocab = data.draw(st.integers(2, 8))
    k = data.draw(st.integers(0, 5))
    target_tokens = data.draw(st.lists(st.integers(0, vocab - 1), min_size=k + 1, max_size=k + 1))
    draft = data.draw(st.lists(st.integers(0, vocab - 1), min_size=k, max_size=k))
    accepted, next_token = greedy_verify(torch.tensor(draft, dtype=torch.long), one_hot_logits(target_tokens, vocab))
    expected = next((i for i in range(k) if draft[i] != target_tokens[i]), k)
    assert accepted == expected
    assert next_token == target_tokens[expected]


# --- logits_to_probs ----------------------------------------------------------------------------


def test_probs_temperature_scales_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0, NEG_INF]])
    for temperature in (0.5, 1.0, 2.0):
        probs = logits_to_probs(logits, temperature)
        assert torch.allclose(probs, torch.softmax(logits / temperature, dim=-1))
        assert probs[0, 3] == 0.0
        assert probs.dtype == torch.float32
    # A lower temperature sharpens: the top token gains mass.
    assert logits_to_probs(logits, 0.5)[0, 0] > logits_to_probs(logits, 2.0)[0, 0]


def test_probs_are_float32_for_half_logits():
    probs = logits_to_probs(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), 1.0)
    assert probs.dtype == torch.float32
    assert torch.allclose(probs.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_probs_reject_non_positive_temperature(temperature):
    with pytest.raises(ValueError):
        logits_to_probs(torch.zeros(3), temperature)


def test_top_p_tiny_keeps_only_the_top_token():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    probs = logits_to_probs(logits, 1.0, top_p=1e-6)
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # softmax of log([0.5, 0.3, 0.15, 0.05]) is exactly those probabilities.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.allclose(logits_to_probs(logits, 1.0, top_p=0.45), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(logits_to_probs(logits, 1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(logits_to_probs(logits, 1.0, top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


@settings(max_examples=150, deadline=None, database=None)
@given(
    logits=st.lists(st.floats(-20, 20), min_size=2, max_size=12),
    temperature=st.floats(0.05, 4.0),
    top_p=st.floats(0.01, 1.0),
)
def test_probs_sum_to_one_and_keep_the_top_token(logits, temperature, top_p):
    logits_t = torch.tensor(logits)
    probs = logits_to_probs(logits_t, temperature, top_p)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert abs(float(probs.sum()) - 1.0) < 1e-5
    full = logits_to_probs(logits_t, temperature)
    assert probs[full == full.max()].sum() > 0  # a most likely token is kept (any one of a float tie)
    # Filtering never keeps a token while dropping a more likely one.
    kept = probs > 0
    assert (full[kept].min() >= full[~kept].max()) if (~kept).any() else True


def nucleus_by_full_sort(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The nucleus filter written the direct way: sort each whole row (the reference)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    top, order = probs.sort(dim=-1, descending=True)
    kept = top.masked_fill((top.cumsum(dim=-1) - top) >= top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, kept)
    return filtered / filtered.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("scale, nucleus_within_guess", [(8.0, True), (0.01, False)])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_top_p_equals_sorting_whole_rows(scale, nucleus_within_guess, top_p):
    """Sharp rows take the partial-sort path, flat rows (nucleus wider than NUCLEUS_GUESS) the full
    sort; both must give exactly what sorting whole rows gives."""
    from flash.engine.verification import NUCLEUS_GUESS

    generator = torch.Generator().manual_seed(int(scale * 100 + top_p * 10))
    logits = torch.randn(3, 5000, generator=generator) * scale
    top = torch.softmax(logits / 0.7, dim=-1).topk(NUCLEUS_GUESS, dim=-1).values.sum(-1)
    assert bool((top >= 0.99).all()) == nucleus_within_guess  # the case is the one it claims to be
    probs = logits_to_probs(logits, 0.7, top_p)
    assert torch.equal(probs, nucleus_by_full_sort(logits, 0.7, top_p))
    assert (probs > 0).sum(-1).min() >= 1


def test_top_p_sorts_only_the_rows_whose_nucleus_is_wide():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5000, generator=generator)
    logits[:, ::2] *= 8.0  # sharp rows next to flat ones, in a [2, 3, V] batch
    logits[:, 1] *= 0.01
    assert torch.equal(logits_to_probs(logits, 0.7, 0.9), nucleus_by_full_sort(logits, 0.7, 0.9))


def test_sample_has_the_distribution_and_never_draws_a_zero():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    generator = torch.Generator().manual_seed(0)
    draws = sample(probs.expand(40000, -1), generator)
    assert draws.shape == (40000,)
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert freq[probs == 0].sum() == 0
    # 4 standard errors of a frequency near 0.5 at n = 40000 is 0.01.
    assert torch.allclose(freq, probs.double(), atol=0.01)


def test_sample_keeps_leading_shape_and_is_seeded():
    probs = torch.softmax(torch.randn(2, 3, 50), dim=-1)
    a = sample(probs, torch.Generator().manual_seed(7))
    b = sample(probs, torch.Generator().manual_seed(7))
    assert a.shape == (2, 3) and torch.equal(a, b)


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.tensor([0.5, float("nan"), 0.5, 0.0])])
def test_sample_refuses_rows_without_mass(bad):
    with pytest.raises(ValueError, match="cannot sample"):
        sample(bad, torch.Generator().manual_seed(0))


# --- sampling_verify: properties ----------------------------------------------------------------


@st.composite
def distributions(draw, vocab: int, rows: int) -> torch.Tensor:
    """``rows`` random distributions over ``vocab`` tokens, some with zeros."""
    weights = draw(
        st.lists(
            st.lists(st.one_of(st.just(0.0), st.floats(0.01, 1.0)), min_size=vocab, max_size=vocab).filter(
                lambda row: sum(row) > 0
            ),
            min_size=rows,
            max_size=rows,
        )
    )
    probs = torch.tensor(weights, dtype=torch.float32)
    return probs / probs.sum(-1, keepdim=True)


@settings(max_examples=200, deadline=None, database=None)
@given(st.data())
def test_sampling_verify_outputs_are_possible_under_the_target(data):
    vocab = data.draw(st.integers(2, 6), label="vocab")
    k = data.draw(st.integers(0, 4), label="k")
    draft_probs = data.draw(distributions(vocab, max(k, 1)), label="draft_probs")[:k]
    target_probs = data.draw(distributions(vocab, k + 1), label="target_probs")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    generator = torch.Generator().manual_seed(seed)
    # Draft tokens must come from the draft's own distribution (nonzero q).
    draft_tokens = sample(draft_probs, generator) if k else torch.empty(0, dtype=torch.long)

    accepted, next_token = sampling_verify(draft_tokens, draft_probs, target_probs, generator)

    assert 0 <= accepted <= k
    assert 0 <= next_token < vocab
    # An accepted draft token is never one the target rules out.
    for i in range(accepted):
        assert target_probs[i, draft_tokens[i]] > 0
    if accepted == k:  # bonus token: drawn from the last target row
        assert target_probs[k, next_token] > 0
    else:  # recovered token: drawn from norm(max(0, p - q)), falling back to p when that is empty
        residual = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0)
        assert residual[next_token] > 0 or (residual.sum() == 0 and target_probs[accepted, next_token] > 0)


def test_sampling_verify_k0_samples_the_target():
    generator = torch.Generator().manual_seed(0)
    target_probs = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    assert sampling_verify(torch.empty(0, dtype=torch.long), None, target_probs, generator) == (0, 2)


def test_sampling_verify_identical_distributions_accept_everything():
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 5, generator=generator), -1)
    for _ in range(200):
        draft_tokens = sample(probs[:3], generator)
        accepted, _ = sampling_verify(draft_tokens, probs[:3], probs, generator)
        assert accepted == 3  # p/q = 1: acceptance is certain


def test_sampling_verify_rejects_tokens_the_target_rules_out():
    generator = torch.Generator().manual_seed(0)
    draft_probs = torch.tensor([[1.0, 0.0, 0.0]])
    target_probs = torch.tensor([[0.0, 0.4, 0.6], [1.0, 0.0, 0.0]])
    for _ in range(50):
        accepted, next_token = sampling_verify(torch.tensor([0]), draft_probs, target_probs, generator)
        assert accepted == 0 and next_token in (1, 2)


# --- sampling_verify: the output distribution is the target's --------------------------------


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def expected_tv(probs: torch.Tensor, n: int) -> float:
    """E[TV(empirical of n samples, probs)] in the normal approximation: sum sqrt(2/pi) sd / 2."""
    return 0.5 * math.sqrt(2 / math.pi) * float((probs * (1 - probs) / n).sqrt().sum())


def chi2_critical(dof: int, z: float = 4.5) -> float:
    """Chi-square quantile at standard-normal score ``z`` (Wilson-Hilferty; z = 4.5: p ~ 3e-6)."""
    c = 2 / (9 * dof)
    return dof * (1 - c + z * math.sqrt(c)) ** 3


TOY_VOCAB = 6
TOY_TARGET = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
TOY_DRAFT = torch.tensor([0.40, 0.05, 0.25, 0.05, 0.05, 0.20])  # deliberately different


def test_first_emitted_token_has_the_target_distribution():
    """Whatever the draft, the first emitted token (d_1 if accepted, else the recovered one) ~ p."""
    generator = torch.Generator().manual_seed(1234)
    k, trials = 3, 20_000
    draft_probs = TOY_DRAFT.expand(k, TOY_VOCAB)
    # The later rows do not affect the first token; give them other shapes anyway.
    target_probs = torch.stack([TOY_TARGET, TOY_DRAFT, torch.full((TOY_VOCAB,), 1 / TOY_VOCAB), TOY_TARGET.flip(0)])
    counts = torch.zeros(TOY_VOCAB)
    for _ in range(trials):
        draft_tokens = sample(draft_probs, generator)
        accepted, next_token = sampling_verify(draft_tokens, draft_probs, target_probs, generator)
        counts[int(draft_tokens[0]) if accepted > 0 else next_token] += 1
    empirical = counts / trials
    bound = 0.02
    assert bound > 2.5 * expected_tv(TOY_TARGET, trials)  # 0.0074 for 20k samples
    assert total_variation(empirical, TOY_TARGET) < bound, (empirical, TOY_TARGET)
    # The test has power: the draft's own distribution is far outside the bound.
    assert total_variation(TOY_DRAFT, TOY_TARGET) > 10 * bound


def _markov(seed: int) -> torch.Tensor:
    """A fixed random transition matrix [V, V] with a few forbidden transitions."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(TOY_VOCAB, TOY_VOCAB, generator=gen) ** 1.5
    weights[torch.rand(TOY_VOCAB, TOY_VOCAB, generator=gen) < 0.2] = 0.0
    weights[:, 0] += 0.01  # keep every row non-empty
    return weights / weights.sum(-1, keepdim=True)


def _speculative_chain(target_chain, draft_chain, start: int, k: int, n_tokens: int, generator) -> list[int]:
    """Chain speculative decoding over toy Markov 'models' until ``n_tokens`` are emitted."""
    out, last = [], start
    while len(out) < n_tokens:
        draft_tokens, prev = [], last
        for _ in range(k):  # the draft proposes autoregressively from its own chain
            prev = int(sample(draft_chain[prev], generator))
            draft_tokens.append(prev)
        draft_tokens = torch.tensor(draft_tokens)
        draft_probs = draft_chain[torch.tensor([last] + draft_tokens[:-1].tolist())]  # q_i given d_<i
        target_probs = target_chain[torch.tensor([last] + draft_tokens.tolist())]  # p_0 .. p_k
        accepted, next_token = sampling_verify(draft_tokens, draft_probs, target_probs, generator)
        out += draft_tokens[:accepted].tolist() + [next_token]
        last = out[-1]
    return out[:n_tokens]


@pytest.mark.parametrize("k", [1, 3])
def test_two_token_joint_distribution_matches_direct_sampling(k):
    """The joint law of the first two emitted tokens equals the target chain's, for any draft."""
    target_chain, draft_chain = _markov(seed=7), _markov(seed=8)
    start, trials = 2, 8_000
    generator = torch.Generator().manual_seed(99 + k)
    counts = torch.zeros(TOY_VOCAB, TOY_VOCAB)
    for _ in range(trials):
        first, second = _speculative_chain(target_chain, draft_chain, start, k, 2, generator)
        counts[first, second] += 1
    empirical = counts / trials
    exact = target_chain[start][:, None] * target_chain  # p(x1) p(x2 | x1)
    tv = total_variation(empirical, exact)
    bound = 2 * expected_tv(exact.flatten(), trials)
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"
    # Pearson chi-square over the cells the target allows; impossible pairs never appear.
    assert counts[exact == 0].sum() == 0
    allowed = exact > 0
    chi2 = float(((counts[allowed] - trials * exact[allowed]) ** 2 / (trials * exact[allowed])).sum())
    dof = int(allowed.sum()) - 1
    assert chi2 < chi2_critical(dof), (chi2, dof)
    # The draft chain's own joint law is far outside the bound (the test can tell them apart).
    draft_joint = draft_chain[start][:, None] * draft_chain
    assert total_variation(draft_joint, exact) > 5 * bound


# --- sibling_verify: siblings drawn without replacement, recursive rejection ---------------------


SIBLING_CASES = [
    # (target p, draft q): a draft far from the target; one that puts 90% on a token the target
    # rarely picks (the second sibling then comes from a q with that token removed: its q is 1, not
    # 0.1, so a check that forgets the removal emits token 1 far too often); supports that barely overlap.
    (TOY_TARGET, TOY_DRAFT),
    (torch.tensor([0.10, 0.30, 0.45, 0.10, 0.05, 0.0]), torch.tensor([0.90, 0.10, 0.0, 0.0, 0.0, 0.0])),
    (torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0, 0.0]), torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0])),
]


@pytest.mark.parametrize("case", range(len(SIBLING_CASES)))
@pytest.mark.parametrize("siblings", [1, 2, 3])
def test_sibling_verify_emits_the_target_distribution(case, siblings):
    target, draft = SIBLING_CASES[case]
    generator = torch.Generator().manual_seed(100 + 10 * case + siblings)
    trials = 20_000
    counts = torch.zeros(TOY_VOCAB)
    accepted = 0
    for _ in range(trials):
        candidates = draw_siblings(draft, siblings, generator)
        assert len(set(candidates)) == len(candidates) == min(siblings, int((draft > 0).sum()))
        pick, token = sibling_verify(candidates, draft, target, generator)
        if pick is not None:
            assert token == candidates[pick]
            accepted += 1
        counts[token] += 1
    assert counts[target == 0].sum() == 0, "a token the target rules out was emitted"
    big = target > 0
    chi2 = float(((counts[big] - trials * target[big]) ** 2 / (trials * target[big])).sum())
    assert chi2 < chi2_critical(int(big.sum()) - 1), (counts / trials, target)
    # One sibling is plain rejection sampling: acceptance sum(min(p, q)). More siblings accept more.
    one = float(torch.minimum(target, draft).sum())
    rate = accepted / trials
    if siblings == 1:
        assert abs(rate - one) < 4 * math.sqrt(one * (1 - one) / trials)
    else:
        assert rate > one + 0.05, (rate, one)


def test_sibling_verify_without_candidates_samples_the_target():
    generator = torch.Generator().manual_seed(7)
    draws = [sibling_verify([], TOY_DRAFT, TOY_TARGET, generator) for _ in range(5000)]
    assert all(pick is None for pick, _ in draws)
    counts = torch.bincount(torch.tensor([token for _, token in draws]), minlength=TOY_VOCAB).double()
    assert total_variation(counts / 5000, TOY_TARGET.double()) < 0.04
