"""The draft model's pieces: teacher-forced training sees exactly what decoding sees."""

from __future__ import annotations

import pytest
import torch

from flash.draft import DraftConfig, FlashDraft, block_mask, train_mask


def small_draft(k: int = 4, seed: int = 0, num_layers: int = 1) -> FlashDraft:
    torch.manual_seed(seed)
    cfg = DraftConfig(target_name="t", hidden_size=64, vocab_size=100, num_heads=4, intermediate_size=128, k=k,
                      max_positions=256, num_layers=num_layers)
    return FlashDraft(cfg).eval()


@pytest.mark.parametrize(("k", "num_layers"), [(1, 1), (2, 1), (4, 1), (6, 1), (4, 3)])
def test_train_forward_equals_propose_at_every_position(k, num_layers):
    draft = small_draft(k, num_layers=num_layers)
    s, n = 24, 10
    stream, gate = torch.randn(s, 64), torch.randn(s, 64)
    with torch.no_grad():
        preds = draft.train_forward(stream, gate[s - n :])
        for r in range(n):
            t = s - n + r
            got = draft.propose(draft.new_state(), stream[:t], stream[t], gate[t], k)
            torch.testing.assert_close(got, preds[:, r], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_incremental_propose_equals_one_shot(num_layers):
    """Growing the cache step by step (as decoding does) gives the same slots as one pass."""
    draft = small_draft(4, num_layers=num_layers)
    stream, gate = torch.randn(30, 64), torch.randn(30, 64)
    with torch.no_grad():
        state = draft.new_state()
        state.keys.fill_(float("nan"))  # new_state leaves its memory unset: no pass may read what it did not write
        state.values.fill_(float("nan"))
        draft.propose(state, stream[:8], stream[8], gate[8], 4)
        draft.propose(state, stream[9:12], stream[12], gate[12], 2)  # speculative slots are overwritten
        got = draft.propose(state, stream[13:20], stream[20], gate[20], 4)
        want = draft.propose(draft.new_state(), stream[:20], stream[20], gate[20], 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert state.length == 21


def test_masks():
    m = block_mask(past=3, m=2, num_slots=3)
    assert m.shape == (5, 8)
    assert m[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # stream entry 0 sees cache + itself
    assert m[4].tolist() == [1] * 8  # last slot sees everything before it
    t = train_mask(s=5, n=2, k=3)
    # slot 2 at stream position 4 (row 5 + 2*1 + 1 = 8): stream <= 4, slot 1 and 2 at position 4.
    row = t[8].tolist()
    assert row[:5] == [1, 1, 1, 1, 1] and row[5:] == [0, 1, 0, 1]


def test_compression_is_a_convex_mix_of_the_span():
    draft = small_draft()
    with torch.no_grad():
        draft.latent_proj.weight.copy_(torch.eye(64))
        span = torch.randn(49, 64)
        latents = draft.compress(span)
    assert latents.shape == (draft.cfg.num_latents, 64)
    lo, hi = span.min(0).values, span.max(0).values
    assert ((latents >= lo - 1e-5) & (latents <= hi + 1e-5)).all()


def test_config_validation():
    with pytest.raises(ValueError):
        DraftConfig(target_name="t", hidden_size=60, vocab_size=10, num_heads=7)
    with pytest.raises(ValueError):
        DraftConfig(target_name="t", hidden_size=64, vocab_size=10, num_heads=4, k=0)
