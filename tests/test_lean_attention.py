"""The in-place KV cache and grouped-KV SDPA give transformers' own numbers, with fewer copies."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from flash.gqa_attention import gqa_sdpa_attention, use_gqa_sdpa
from flash.kv_cache import InPlaceLayer, in_place_cache


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def run_steps(model, cache, steps):
    """Feed token blocks / crops through ``model`` with ``cache``: returns every block's logits."""
    out, length = [], 0
    for step in steps:
        if isinstance(step, int):  # a crop back to this length
            cache.crop(step - length)
            length = step
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([step]), past_key_values=cache, use_cache=True).logits
        out.append(logits)
        length += len(step)
    return out


# A prefill, one-token steps, verification blocks with crops (speculative decoding's pattern), and
# a block long enough to outgrow the first buffer.
STEPS = [list(range(1, 12)), [5], [6, 7, 8, 9, 10], 13, [20, 21, 22], 14, [30], list(range(40, 96)) * 6, [3]]


def test_in_place_cache_matches_dynamic_cache_through_crops_and_growth():
    model = tiny_llama()
    want = run_steps(model, DynamicCache(config=model.config), STEPS)
    cache = in_place_cache(model.config)
    got = run_steps(model, cache, STEPS)
    assert all(isinstance(layer, InPlaceLayer) for layer in cache.layers)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 14 + 1 + 336 + 1
    buffer = cache.layers[0]._key_buffer
    assert buffer.shape[-2] >= cache.get_seq_length() > 256 + 11  # it grew past its first allocation
    # Crops move a length, not data: the view still points into the same buffer.
    cache.crop(-100)
    assert cache.layers[0].keys.data_ptr() == buffer.data_ptr() and cache.get_seq_length() == 252


def test_gqa_sdpa_matches_transformers_sdpa_in_a_model():
    reference, lean = tiny_llama(), tiny_llama()
    use_gqa_sdpa(lean)
    assert lean.config._attn_implementation == "sdpa_gqa"
    want = run_steps(reference, DynamicCache(config=reference.config), STEPS)
    got = run_steps(lean, in_place_cache(lean.config), STEPS)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("q_len", "kv_len", "masked"), [(1, 9, False), (4, 4, False), (3, 10, False), (3, 10, True)])
def test_gqa_sdpa_equals_repeated_heads(q_len, kv_len, masked):
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 6, q_len, 8), torch.randn(1, 2, kv_len, 8), torch.randn(1, 2, kv_len, 8)
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)  # bottom-right aligned
    mask = causal.clone()
    if masked:
        mask[:, 0] = False  # e.g. a padded first position
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask)
    module = torch.nn.Module()
    got, _ = gqa_sdpa_attention(module, query, key, value, mask[None, None] if masked else None)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_in_place_cache_drops_and_repeats_batch_rows_like_dynamic_cache():
    model = tiny_llama()
    prompt = torch.tensor([[4, 5, 6, 7], [8, 9, 10, 11]])

    def run(cache):
        with torch.inference_mode():
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
            model(input_ids=torch.tensor([[1], [2], [3], [4]]), past_key_values=cache, use_cache=True)
            cache.batch_select_indices(torch.tensor([1, 2]))  # a finished row leaves
            return model(input_ids=torch.tensor([[5, 6], [7, 8]]), past_key_values=cache, use_cache=True).logits

    torch.testing.assert_close(run(in_place_cache(model.config)), run(DynamicCache(config=model.config)),
                               rtol=0, atol=1e-5)
