"""The draft-confidence cut (min_draft_prob): fewer proposals, same output."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from flash.engine import GenerationConfig, collect, generate


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


def test_confidence_cut_proposes_less(smollm2_target, photos, make_draft):
    draft = make_draft(smollm2_target, k=4)
    prompt = smollm2_target.build_prompt(photos["coffee"], "Describe this image in detail.")
    base = GenerationConfig(max_new_tokens=16, rules=smollm2_target.logits_rules())
    full = collect(generate(smollm2_target, prompt, "flash", draft, base))
    cut = collect(generate(smollm2_target, prompt, "flash", draft, replace(base, min_draft_prob=0.9)))
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


@pytest.mark.parametrize("rules_active", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 1e-6, 1e-3, 0.3])
def test_the_cut_is_on_the_joint_confidence(tiny_llava, make_draft, rules_active, threshold):
    """Drafts are kept while the product of the draft's top-token probabilities stays >= the cut."""
    from flash.engine.logits_rules import LogitsRules
    from flash.engine.proposers import _draft_tokens

    draft = make_draft(tiny_llava, k=4)
    rules = LogitsRules(repetition_penalty=1.3, no_repeat_ngram_size=2) if rules_active else LogitsRules()
    config = GenerationConfig(rules=rules, min_draft_prob=threshold)
    torch.manual_seed(0)
    features = torch.randn(4, tiny_llava.hidden_size) * 3
    context = [5, 6, 5]
    # The rules' state after the generated [5, 6], and 5 drafted earlier in the same step (the chain's path).
    cursor = rules.cursor(context[:2]) if rules_active else None
    ids, _, joint = _draft_tokens(draft, features, config, torch.Generator(), cursor, context[2:], joint=0.9)
    # The same walk by hand, one row at a time.
    expected, conf = [], 0.9
    for i in range(4):
        row = rules.apply(draft.to_target_vocab(draft.draft_logits(features[i : i + 1]).float(), float("-inf")),
                          context + expected, len(context) + i)
        if threshold and conf * float(row.softmax(-1).max()) < threshold:
            break
        conf *= float(row.softmax(-1).max())
        expected.append(int(row.argmax()))
    assert ids.tolist() == expected and joint == pytest.approx(conf, rel=1e-5)  # float32 products
    if threshold == 0.0:
        assert len(expected) == 4
