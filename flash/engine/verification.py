"""Pure verification math for chain speculative decoding (no models, no global RNG).

Vocabulary, once (FLASH.md; Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding", Algorithm 1; Chen et al. 2023):
- *draft tokens* ``d_1..d_k`` are proposed by the draft; ``draft_probs[i]`` is the draft's
  distribution q_{i+1} that ``d_{i+1}`` was sampled from (the paper's q).
- ``target_logits[i]`` / ``target_probs[i]`` are the target's next-token scores after the verified
  prefix ``x, d_1..d_i`` (the paper's p); row ``i`` checks ``d_{i+1}``, row ``k`` gives the bonus.
- *accepted*: the length of the accepted draft prefix, 0..k.
- *next token*: the target's own token that follows the accepted prefix: the greedy argmax, the
  *recovered* token sampled from norm(max(0, p - q)) at the first rejection, or the *bonus* token
  sampled from p_k when all k drafts are accepted. It is always correct, so every verification
  yields accepted + 1 tokens.
"""

from __future__ import annotations

import torch

#: How many top tokens :func:`logits_to_probs` searches for the nucleus before sorting whole rows.
NUCLEUS_GUESS = 256


def greedy_verify(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Accept the longest prefix of ``draft_tokens`` [k] equal to the target's argmax.

    ``target_logits``: [k+1, V]. Returns (accepted, next_token).
    """
    k = draft_tokens.shape[0]
    target_tokens = target_logits.argmax(dim=-1)  # [k+1]
    matches = (draft_tokens == target_tokens[:k]).to(torch.int64)
    accepted = int(matches.cumprod(dim=0).sum())  # one host sync per step
    return accepted, int(target_tokens[accepted])


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Temperature + nucleus (top-p) filtering, in float32. ``logits``: [..., V] -> probs [..., V]."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling; use greedy decoding for 0")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    # The nucleus is usually a few dozen tokens: look for it among each row's top NUCLEUS_GUESS
    # (a partial sort; top-p over a 49k row then costs 0.7 ms here instead of 5.7,
    # research/sampler_cost.py) and sort only the rows whose nucleus is wider. Same result either
    # way: the top entries and their running sums are the sorted row's first ones (exactly tied
    # values aside, whose order neither call defines).
    flat = probs.reshape(-1, probs.shape[-1])
    top, order = flat.topk(min(NUCLEUS_GUESS, flat.shape[-1]), dim=-1)
    filtered = _nucleus(top, order, top_p, flat)
    wide = top.cumsum(dim=-1)[:, -1] < top_p  # the next token would still be kept: sort the row
    if top.shape[-1] < flat.shape[-1] and bool(wide.any()):
        rows = flat[wide]
        filtered[wide] = _nucleus(*rows.sort(dim=-1, descending=True), top_p, rows)
    filtered = filtered.reshape(probs.shape)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def _nucleus(top: torch.Tensor, order: torch.Tensor, top_p: float, like: torch.Tensor) -> torch.Tensor:
    """Rows of ``like``'s shape holding the smallest prefix of ``top`` (descending, at columns ``order``)
    whose mass reaches ``top_p``; the top token is always kept. Not renormalised."""
    mass = top.cumsum(dim=-1)
    return torch.zeros_like(like).scatter(-1, order, top.masked_fill((mass - top) >= top_p, 0.0))


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded generator on ``device`` (the device the target's logits come out on)."""
    return torch.Generator(device=device).manual_seed(seed)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One sample per row of ``probs`` [..., V] -> [...] (seeded, no global RNG).

    Inverse CDF: one uniform per row, placed in the row's running sum (float64). Same law as
    ``torch.multinomial``, which draws one random number per vocabulary entry (a 49k row: 1.9 ms
    here, this 0.3 ms; ``research/sampler_cost.py``). A token with zero probability is never drawn. The draw happens on
    the generator's device (a model split over GPUs may emit logits elsewhere).
    """
    flat = probs.reshape(-1, probs.shape[-1]).to(generator.device)
    cdf = flat.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):
        raise ValueError("cannot sample: a row of probabilities sums to zero or is not finite")
    uniform = torch.rand(flat.shape[0], 1, generator=generator, dtype=torch.float64, device=generator.device)
    # Strictly below the total (u * total can round up to it), so the draw lands on a token with mass.
    point = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).reshape(probs.shape[:-1])


def sampling_verify(
    draft_tokens: torch.Tensor,  # [k]
    draft_probs: torch.Tensor,  # [k, V]
    target_probs: torch.Tensor,  # [k+1, V]
    generator: torch.Generator,
) -> tuple[int, int]:
    """Lossless rejection sampling over a chain of k draft tokens. Returns (accepted, next_token).

    Accept ``d_i`` with probability min(1, p(d_i) / q(d_i)); on the first rejection sample the
    recovered token from norm(max(0, p - q)); if all are accepted, sample the bonus from p_k.
    The output then has exactly the target's distribution, whatever q is (q need only be the
    distribution each d_i was drawn from).
    """
    k = draft_tokens.shape[0]
    if k == 0:
        return 0, int(sample(target_probs[0], generator))
    idx = torch.arange(k, device=target_probs.device)
    draft_tokens, draft_probs = draft_tokens.to(target_probs.device), draft_probs.to(target_probs.device)
    p_tok = target_probs[idx, draft_tokens]
    q_tok = draft_probs[idx, draft_tokens]
    uniform = torch.rand(k, generator=generator, dtype=torch.float32, device=generator.device).to(p_tok.device)
    # u < p/q  <=>  u * q < p (no division by a zero q).
    accept = (uniform * q_tok < p_tok).to(torch.int64)
    accepted = int(accept.cumprod(dim=0).sum())
    if accepted == k:
        return k, int(sample(target_probs[k], generator))
    residual = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0.0)
    total = residual.sum()
    if total <= 0:  # p == q exactly: rejection had probability 0; fall back to p itself
        residual, total = target_probs[accepted], target_probs[accepted].sum()
    return accepted, int(sample(residual / total, generator))


def draw_siblings(q: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
    """Up to ``count`` distinct tokens from ``q`` [V]: the first from q, each next from q with the
    earlier ones removed (fewer where q holds fewer tokens) -- the order :func:`sibling_verify` checks."""
    rest, drawn = q.clone(), []
    while len(drawn) < count and rest.sum() > 0:
        drawn.append(int(sample(rest, generator)))
        rest[drawn[-1]] = 0.0
    return drawn


def sibling_verify(
    candidates: list[int],
    draft_probs: torch.Tensor,  # [V]
    target_probs: torch.Tensor,  # [V]
    generator: torch.Generator,
) -> tuple[int | None, int]:
    """Lossless rejection sampling over sibling draft tokens drawn *without replacement* from q.

    ``candidates`` are tree siblings in the order they were drawn: the first from q, each next one
    from q with the earlier ones removed (renormalised). Candidate i is accepted with probability
    min(1, r_i(c_i) / q_i(c_i)), where q_i is the distribution it was drawn from and r_i the current
    residual (r_1 = p); on a rejection r_{i+1} = norm(max(0, r_i - q_i)) (Sequoia, Chen et al. 2024).
    Returns (index of the accepted candidate, its token), or (None, a draw from the last residual).
    The output has exactly the target's law p: conditioned on each rejection the next round is plain
    rejection sampling of r_{i+1}, whatever q_{i+1} is. No candidates: one draw from p.
    """
    p = target_probs.double()
    q = draft_probs.to(p.device).double()
    uniforms = torch.rand(len(candidates), generator=generator, dtype=torch.float64, device=generator.device)
    for i, token in enumerate(candidates):
        q_total = q.sum()
        if q_total <= 0:
            break  # nothing left to draw from: a later candidate cannot have been drawn from q_i
        q = q / q_total
        if q[token] > 0 and float(uniforms[i]) * float(q[token]) < float(p[token]):
            return i, token
        residual = (p - q).clamp_min(0.0)
        total = residual.sum()
        if total > 0:  # total 0 means p == q_i: the rejection had probability 0
            p = residual / total
        q[token] = 0.0  # q is this round's own normalised copy
    return None, int(sample(p, generator))
