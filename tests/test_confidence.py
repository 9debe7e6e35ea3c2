"""The draft-confidence cut (min_draft_prob): fewer proposals, same output."""

from __future__ import annotations

from dataclasses import replace

import pytest

from flash.decoding import GenerationConfig, collect, generate


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.5, 0.99])
@pytest.mark.parametrize("method", ["flash", "eagle"])
def test_confidence_cut_keeps_greedy_output(tiny_llava, photos, make_echo_draft, method, threshold):
    target = tiny_llava
    draft = make_echo_draft(target, k=4)
    prompt = target.build_prompt(photos["chelsea"], "describe the picture")
    config = GenerationConfig(max_new_tokens=24)
    ar = collect(generate(target, prompt, "ar", None, config))
    events = list(generate(target, prompt, method, draft, replace(config, min_draft_prob=threshold)))
    assert collect(events).tokens == ar.tokens
    assert all(e.proposed <= 4 for e in events)
    if threshold == 0.0:  # no cut: every step but the last proposes the full k
        assert all(e.proposed == min(4, config.max_new_tokens - e.total_tokens + len(e.tokens) - 1)
                   for e in events[1:])


def test_confidence_cut_proposes_less(default_target, photos, make_draft):
    draft = make_draft(default_target, k=4)
    prompt = default_target.build_prompt(photos["coffee"], "Describe this image in detail.")
    base = GenerationConfig(max_new_tokens=16, rules=default_target.logits_rules())
    full = collect(generate(default_target, prompt, "flash", draft, base))
    cut = collect(generate(default_target, prompt, "flash", draft, replace(base, min_draft_prob=0.9)))
    assert cut.tokens == full.tokens
    assert cut.proposed < full.proposed


def test_sampling_with_cut_runs_and_validates(tiny_llava, photos, make_echo_draft):
    draft = make_echo_draft(tiny_llava, k=3)
    prompt = tiny_llava.build_prompt(photos["coffee"], "what is it")
    out = collect(generate(tiny_llava, prompt, "flash", draft,
                           GenerationConfig(max_new_tokens=12, temperature=1.0, seed=3, min_draft_prob=0.1)))
    assert len(out.tokens) == 12 or out.tokens[-1] in tiny_llava.eos_token_ids
    with pytest.raises(ValueError):
        GenerationConfig(min_draft_prob=1.0)
