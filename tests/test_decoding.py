"""The decoding loops against plain decoding: greedy output identical, sampled output equal in law.

Targets: the embedded default target (SmolLM2 + MobileNetV2, real photos) and tiny random LLaVA /
Qwen2.5-VL models. Drafts: untrained random ones (never accepted on a real vocabulary), an *echo*
draft (a real FlashDraft proposing from the target's previous-position distribution) and a
*scripted* draft (a real FlashDraft whose token choice follows plain decoding's output with
deliberate mistakes), so acceptance, rejection and rollback are all exercised.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from flash.draft import DraftConfig, DraftError, FlashDraft
from flash.engine import GenerationConfig, GenerationResult, StepEvent, collect, generate
from flash.engine.logits_rules import LogitsRules
from flash.engine.verification import logits_to_probs
from flash.targets.base import Prompt, TargetModel

MAX_NEW = 24
pytestmark = pytest.mark.usefixtures("single_thread")


# --- helpers: running and checking ---------------------------------------------------------------


def effective_k(method: str, draft: FlashDraft | None, config: GenerationConfig) -> int:
    if method == "ar":
        return 0
    if method == "pld":
        return config.k or 8
    k = config.k or draft.cfg.k
    return k if method == "eagle" else min(k, draft.cfg.k)


def check_events(events: list[StepEvent], method: str, target: TargetModel, config: GenerationConfig, k: int) -> None:
    """Every invariant a StepEvent stream promises, for any method."""
    assert events, "no events"
    first = events[0]
    assert (first.step, len(first.tokens), first.accepted, first.proposed) == (0, 1, 0, 0), first  # the prefill
    total, clock = 0, 0.0
    for i, event in enumerate(events):
        assert event.method == method and event.step == i
        assert 0 <= event.accepted <= event.proposed, event
        assert 1 <= len(event.tokens) and event.accepted <= len(event.tokens) <= event.accepted + 1, event
        if i:  # never propose more than can still be emitted after the pending token
            most = min(k, config.max_new_tokens - total - 1)
            # A draft model always fills its slots; prompt lookup proposes only what it finds.
            assert event.proposed == most if method in ("flash", "eagle") else event.proposed <= most, (event, total)
        total += len(event.tokens)
        assert event.total_tokens == total, event
        assert event.done == (i == len(events) - 1), event  # the last one is done, only the last
        if not event.done:
            assert len(event.tokens) == event.accepted + 1, event  # a full step emits all it verified
        assert event.draft_seconds >= 0 and event.verify_seconds >= 0 and event.total_seconds >= clock
        clock = event.total_seconds
    tokens = [t for e in events for t in e.tokens]
    assert len(tokens) <= config.max_new_tokens
    assert not set(tokens[:-1]) & target.eos_token_ids, "tokens emitted after an EOS"
    if len(tokens) < config.max_new_tokens:
        assert tokens[-1] in target.eos_token_ids, "stopped early without an EOS"


def run_events(target: TargetModel, prompt: Prompt, method: str, draft: FlashDraft | None,
               config: GenerationConfig) -> list[StepEvent]:
    events = list(generate(target, prompt, method, draft, config))
    check_events(events, method, target, config, effective_k(method, draft, config))
    return events


def run(target: TargetModel, prompt: Prompt, method: str, draft: FlashDraft | None,
        config: GenerationConfig) -> GenerationResult:
    return collect(run_events(target, prompt, method, draft, config))


def greedy(target: TargetModel, max_new_tokens: int = MAX_NEW, rules: LogitsRules | None = None,
           k: int | None = None) -> GenerationConfig:
    """Greedy decoding with the target's own default rules (repetition penalty, n-gram ban)."""
    rules = target.logits_rules() if rules is None else rules
    return GenerationConfig(max_new_tokens=max_new_tokens, rules=rules, k=k)


def build_prompt(target: TargetModel, media, text: str | None) -> Prompt:
    return target.build_prompt(media, text if text is not None else target.default_prompt(media))


@torch.inference_mode()
def plain_next_logits(target: TargetModel, prompt: Prompt, rules: LogitsRules, prefix: list[int]) -> torch.Tensor:
    """The processed next-token logits [V] after ``prefix``, recomputed by one-token-at-a-time decoding."""
    pre = target.prefill(prompt)
    logits = pre.last_logits[None]
    for token in prefix:
        logits, _ = target.forward(pre.state, torch.tensor([[token]], device=target.device))
    return rules.apply(logits[-1:].float(), list(prefix), len(prefix))[0]


def assert_same_tokens(target: TargetModel, prompt: Prompt, rules: LogitsRules, expected, actual, label: str) -> None:
    """Exact equality with plain decoding; on a divergence, say where and how close the target's call was."""
    expected, actual = list(expected), list(actual)
    if actual == expected:
        return
    pairs = enumerate(zip(expected, actual, strict=False))
    j = next((i for i, (a, b) in pairs if a != b), min(len(expected), len(actual)))
    logits = plain_next_logits(target, prompt, rules, expected[:j])
    (top1, top2), (id1, id2) = logits.topk(2)
    ar_tok = expected[j] if j < len(expected) else "<end>"
    got_tok = actual[j] if j < len(actual) else "<end>"
    pytest.fail(
        f"{label}: differs from ar at position {j}: ar {ar_tok} vs {got_tok}. Target top-2 there by plain "
        f"decoding: {int(id1)} ({float(top1):.5f}) and {int(id2)} ({float(top2):.5f}), gap {float(top1 - top2):.3g}"
        f"{' (a near-tie: rounding of batched verification may explain it)' if float(top1 - top2) < 1e-3 else ''}."
        f"\n  ar:  {expected}\n  got: {actual}"
    )


def with_eos(target: TargetModel, extra: set[int]) -> TargetModel:
    """A shallow copy of ``target`` that also stops at ``extra`` (the shared fixture is untouched)."""
    clone = copy.copy(target)
    clone.eos_token_ids = frozenset(target.eos_token_ids) | frozenset(extra)
    return clone


class ArReference:
    """Plain greedy decoding results, computed once per (target, media, prompt, length, rules)."""

    def __init__(self) -> None:
        self._memo: dict = {}

    def __call__(self, target: TargetModel, media, text: str | None, config: GenerationConfig):
        key = (id(target), id(media), text, config.max_new_tokens, config.rules)
        if key not in self._memo:
            prompt = build_prompt(target, media, text)
            self._memo[key] = (prompt, run(target, prompt, "ar", None, config).tokens)
        return self._memo[key]


@pytest.fixture(scope="module")
def ar_reference() -> ArReference:
    return ArReference()


@pytest.fixture(scope="module")
def media(photos, videos) -> Callable:
    def lookup(name: str | None):
        return None if name is None else {**photos, **videos}[name]

    return lookup


# --- the scripted draft ------------------------------------------------------------------------


class ScriptedDraft(FlashDraft):
    """A real FlashDraft (its propose() and caches run as usual) whose tokens follow a script.

    ``script`` is plain decoding's output; the draft proposes ``script[j]`` for generated position
    j, except ``(script[j] + 1) % V`` at positions in ``wrong_at``. The generated position is read
    off the draft's own cache: slot 0 of a pass at draft position P proposes position P - P0 + 1,
    P0 being the first pass's position (each emitted token adds one stream entry).
    """

    def __init__(self, cfg: DraftConfig, script=(), wrong_at=()) -> None:
        super().__init__(cfg)
        self.script, self.wrong_at = list(script), frozenset(wrong_at)
        self._state, self._origin, self._ids = None, 0, []

    def propose(self, state, stream, last_feature, last_hidden, num_slots):
        features = super().propose(state, stream, last_feature, last_hidden, num_slots)
        position = state.length - 1  # the slot-0 entry this pass cached
        if state is not self._state:  # a new request
            self._state, self._origin = state, position
        first = position - self._origin + 1
        self._ids = [self.scripted(first + i) for i in range(num_slots)]
        return features

    def scripted(self, index: int) -> int:
        token = self.script[index] if index < len(self.script) else 0
        return (token + 1) % self.cfg.vocab_size if index in self.wrong_at else token

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        assert features.shape[0] == len(self._ids)
        logits = torch.full((len(self._ids), self.cfg.draft_vocab_size or self.cfg.vocab_size), -20.0)
        logits[torch.arange(len(self._ids)), torch.tensor(self._ids)] = 20.0
        return logits


def predicted_steps(n_tokens: int, k: int, wrong_at, max_new_tokens: int) -> list[tuple[int, int, int]]:
    """(proposed, accepted, emitted) of each step of a greedy ScriptedDraft run that emits n_tokens."""
    steps, generated = [], 1
    while generated < n_tokens:
        proposed = min(k, max_new_tokens - generated - 1)
        accepted = next((i for i in range(proposed) if generated + i in wrong_at), proposed)
        emitted = min(accepted + 1, n_tokens - generated)  # an EOS among the drafts ends the step
        steps.append((proposed, min(accepted, emitted), emitted))
        generated += emitted
    return steps


def check_scripted_run(events: list[StepEvent], ar_tokens, k: int, wrong_at, max_new_tokens: int) -> None:
    observed = [(e.proposed, e.accepted, len(e.tokens)) for e in events[1:]]
    assert observed == predicted_steps(len(ar_tokens), k, wrong_at, max_new_tokens)


# --- greedy: the default target -------------------------------------------------------------------

DEFAULT_CASES = [
    # media, prompt (None: the target's default), method, k, num_latents (0: no compression)
    ("chelsea", "What animal is in the picture?", "flash", 6, 8),
    ("chelsea", "What animal is in the picture?", "eagle", 2, 8),
    ("coffee", None, "flash", 1, 0),
    ("astronaut", "Describe this image in detail.", "eagle", 3, 0),
    ("cat-pan-4", None, "flash", 4, 4),
    (None, "Name three colours.", "flash", 2, 1),
    ("coffee", None, "pld", 4, 0),  # prompt lookup: training-free, accepts what the prompt repeats
]


@pytest.mark.parametrize("media_name,text,method,k,num_latents", DEFAULT_CASES)
def test_default_target_random_draft_matches_ar(smollm2_target, media, ar_reference, make_draft,
                                                media_name, text, method, k, num_latents):
    config = greedy(smollm2_target)
    prompt, expected = ar_reference(smollm2_target, media(media_name), text, config)
    if method == "pld":
        draft, config = None, greedy(smollm2_target, k=k)
    else:
        draft = make_draft(smollm2_target, k=k, num_latents=num_latents, seed=k)
    result = run(smollm2_target, prompt, method, draft, config)
    assert_same_tokens(smollm2_target, prompt, config.rules, expected, result.tokens, f"{method} k={k} C={num_latents}")


SCRIPTED_CASES = [
    # media, method, k, num_latents, wrong_at
    ("cat-pan-4", "flash", 6, 8, {3, 4, 9}),
    ("rocket", "eagle", 4, 0, {2, 7, 8}),
    ("chelsea", "flash", 3, 1, set()),
]


@pytest.mark.parametrize("media_name,method,k,num_latents,wrong_at", SCRIPTED_CASES)
def test_default_target_scripted_draft_is_accepted_and_exact(smollm2_target, media, ar_reference, make_draft,
                                                             media_name, method, k, num_latents, wrong_at):
    config = greedy(smollm2_target)
    prompt, expected = ar_reference(smollm2_target, media(media_name), None, config)
    draft = make_draft(smollm2_target, k=k, num_latents=num_latents, cls=ScriptedDraft, script=expected,
                       wrong_at=wrong_at)
    events = run_events(smollm2_target, prompt, method, draft, config)
    result = collect(events)
    assert_same_tokens(smollm2_target, prompt, config.rules, expected, result.tokens, f"scripted {method} k={k}")
    check_scripted_run(events, expected, k, wrong_at, config.max_new_tokens)
    assert result.accepted > 0 and result.steps < len(expected) - 1  # fewer target passes than ar


# --- stopping: EOS inside a step, max_new_tokens inside a step ------------------------------------


@pytest.mark.parametrize("eos_role", ["accepted draft", "bonus"])
def test_eos_inside_a_step_stops_exactly_there(smollm2_target, photos, ar_reference, make_draft, eos_role):
    """Plain decoding's token at position j becomes an EOS: every method stops right after it."""
    config, k = greedy(smollm2_target), 6
    prompt, full = ar_reference(smollm2_target, photos["rocket"], "What is happening here?", config)
    # A scripted step with no mistakes covers k + 1 positions: k accepted drafts, then the bonus at
    # positions k + 1, 2(k + 1), ...; j's token must not occur earlier, or plain decoding stops there.
    j = next(j for j in range(2, len(full) - 1)
             if full[j] not in full[:j] and (j % (k + 1) == 0) == (eos_role == "bonus"))  # fmt: skip
    target = with_eos(smollm2_target, {full[j]})
    expected = full[: j + 1]  # the EOS itself included, nothing after it
    assert run(target, prompt, "ar", None, config).tokens == expected
    for method in ("flash", "eagle"):
        draft = make_draft(target, k=k, num_latents=4, cls=ScriptedDraft, script=full)
        events = run_events(target, prompt, method, draft, config)
        assert collect(events).tokens == expected, method
        check_scripted_run(events, expected, k, (), config.max_new_tokens)
        last = events[-1]
        assert last.accepted == len(last.tokens) - (eos_role == "bonus"), (method, last)
    random = run(target, prompt, "flash", make_draft(target, k=3), config)
    assert random.tokens == expected
    assert smollm2_target.eos_token_ids != target.eos_token_ids  # the shared fixture is untouched


MAX_NEW_CASES = [("tiny_llava", m) for m in (1, 2, 3, 5, 7)] + [("tiny_qwen", 4), ("smollm2_target", 2),
                                                                   ("smollm2_target", 7)]


@pytest.mark.parametrize("target_fixture,max_new_tokens", MAX_NEW_CASES)
def test_max_new_tokens_inside_a_step(request, photos, ar_reference, make_draft, target_fixture, max_new_tokens):
    target = request.getfixturevalue(target_fixture)
    config = greedy(target, max_new_tokens)
    prompt, full = ar_reference(target, photos["rocket"], "What is happening here?", greedy(target))
    assert len(full) > 7 and not set(full[:7]) & target.eos_token_ids
    expected = full[:max_new_tokens]
    assert run(target, prompt, "ar", None, config).tokens == expected
    for method, k, wrong_at in (("flash", 4, {2}), ("eagle", 3, set())):
        draft = make_draft(target, k=k, num_latents=8, cls=ScriptedDraft, script=full, wrong_at=wrong_at)
        events = run_events(target, prompt, method, draft, config)
        assert collect(events).tokens == expected, method
        check_scripted_run(events, expected, k, wrong_at, max_new_tokens)
    random = run(target, prompt, "flash", make_draft(target, k=2, num_latents=0), config)
    assert random.tokens == expected


def test_divergence_report_names_the_position_and_the_top2_gap(tiny_llava, photos, ar_reference):
    config = greedy(tiny_llava, 8)
    prompt, expected = ar_reference(tiny_llava, photos["chelsea"], "describe the cat", config)
    wrong = list(expected)
    wrong[3] = (wrong[3] + 1) % tiny_llava.vocab_size
    with pytest.raises(pytest.fail.Exception, match=r"differs from ar at position 3: .* gap \d"):
        assert_same_tokens(tiny_llava, prompt, config.rules, expected, wrong, "test")
    logits = plain_next_logits(tiny_llava, prompt, config.rules, list(expected[:3]))
    assert int(logits.argmax()) == expected[3]  # the recomputation is plain decoding's


# --- events and the result summary ----------------------------------------------------------------


def test_result_summarises_events(smollm2_target, photos, ar_reference, make_draft):
    config = greedy(smollm2_target)
    prompt, expected = ar_reference(smollm2_target, photos["chelsea"], None, config)
    ar = run(smollm2_target, prompt, "ar", None, config)
    assert (ar.steps, ar.accepted, ar.proposed) == (len(expected) - 1, 0, 0)
    assert ar.tau == 1.0 and ar.acceptance_rate == 0.0

    draft = make_draft(smollm2_target, k=4, cls=ScriptedDraft, script=expected, wrong_at={3})
    events = run_events(smollm2_target, prompt, "flash", draft, config)
    result = collect(events)
    assert result.method == "flash" and result.tokens == expected
    assert result.steps == len(events) - 1
    assert result.accepted == sum(e.accepted for e in events) and result.proposed == sum(e.proposed for e in events)
    # tau counts the target's own token each step: (new tokens - prefill token) / verification passes.
    assert result.tau == pytest.approx((len(expected) - 1) / result.steps)
    assert result.tau > 1.0
    assert result.acceptance_rate == pytest.approx(result.accepted / result.proposed)
    assert 0 < result.acceptance_rate < 1  # the wrong draft at position 3 was rejected
    # Each full step emits accepted + 1; only the last may be cut short by an EOS.
    assert result.accepted + result.steps - 1 <= result.new_tokens - 1 <= result.accepted + result.steps
    assert result.prefill_seconds == events[0].verify_seconds
    assert result.seconds == events[-1].total_seconds >= result.draft_seconds
    assert result.tokens_per_s == pytest.approx(result.new_tokens / result.seconds)


# --- drafts: wrong target, save/load, configuration -------------------------------------------------


def test_draft_for_another_target_is_refused(smollm2_target):
    other = DraftConfig("other", hidden_size=smollm2_target.hidden_size, vocab_size=smollm2_target.vocab_size)
    with pytest.raises(DraftError, match="other"):
        FlashDraft(other).bind(smollm2_target)
    wrong_size = DraftConfig(smollm2_target.name, hidden_size=64, vocab_size=smollm2_target.vocab_size, num_heads=4)
    with pytest.raises(DraftError, match="hidden size"):
        FlashDraft(wrong_size).bind(smollm2_target)


def test_generate_rejects_bad_requests(smollm2_target, photos):
    prompt = build_prompt(smollm2_target, photos["coffee"], None)
    with pytest.raises(ValueError, match="unknown method"):
        generate(smollm2_target, prompt, "medusa")
    for method in ("flash", "eagle"):
        with pytest.raises(ValueError, match="needs a draft"):
            generate(smollm2_target, prompt, method, None)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"temperature": -0.1}, {"top_p": 0.0},
                                    {"top_p": 1.5}, {"k": 0}])
def test_generation_config_validates(kwargs):
    with pytest.raises(ValueError):
        GenerationConfig(**kwargs)


def test_save_load_round_trip_gives_identical_proposals(tiny_llava, photos, make_draft, tmp_path):
    target = tiny_llava
    draft = make_draft(target, k=4, num_latents=4, seed=3)
    with torch.no_grad():  # the file stores fp16: start from fp16-exact weights so the trip is lossless
        for param in draft.parameters():
            param.copy_(param.half().float())
    draft.save(tmp_path / "draft")
    loaded = FlashDraft.load(tmp_path / "draft").bind(target)
    assert loaded.cfg == draft.cfg

    prompt = build_prompt(target, photos["chelsea"], "describe the cat")
    pre = target.prefill(prompt)
    first = int(pre.last_logits.argmax())
    proposals = []
    for model in (draft, loaded):
        with torch.inference_mode():
            stream, last = model.prompt_stream(prompt.input_ids[0], prompt.media_spans, pre.hidden, first)
            proposals.append(model.propose(model.new_state(), stream, last, pre.hidden[-1], 4))
    assert torch.equal(proposals[0], proposals[1])
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=5)  # sampling: q must match too
    steps = [[(e.tokens, e.accepted, e.proposed) for e in run_events(target, prompt, "flash", model, config)]
             for model in (draft, loaded)]
    assert steps[0] == steps[1]


def test_loading_a_missing_or_broken_draft_raises_draft_error(tmp_path):
    with pytest.raises(DraftError):
        FlashDraft.load(tmp_path / "nowhere")
    (tmp_path / "draft_config.json").write_text("{not json")
    with pytest.raises(DraftError):
        FlashDraft.load(tmp_path)


# --- greedy: tiny LLaVA and Qwen2.5-VL ------------------------------------------------------------

TINY_CASES = [
    # media, prompt, k, num_latents, rules (None: the target's own)
    ("chelsea", "describe the cat", 1, 0, None),
    ("astronaut", "what is the person holding ?", 2, 1, None),
    ("rocket", "describe the image in detail", 3, 4, None),
    ("cat-pan-4", "what happens in this video ?", 4, 8, None),
    ("coffee-pan-3", "describe the video", 5, 2, None),
    (None, "the sky is", 6, 8, None),
    ("coffee", "what is on the table ?", 6, 4, LogitsRules(repetition_penalty=1.3, no_repeat_ngram_size=2)),
]


@pytest.mark.parametrize("target_fixture", ["tiny_llava", "tiny_qwen"])
@pytest.mark.parametrize("media_name,text,k,num_latents,rules", TINY_CASES,
                         ids=[f"{c[0]}-k{c[2]}-C{c[3]}{'-penalties' if c[4] else ''}" for c in TINY_CASES])
def test_tiny_targets_match_ar(request, media, ar_reference, make_draft, target_fixture,
                               media_name, text, k, num_latents, rules):
    target = request.getfixturevalue(target_fixture)
    config = greedy(target, 20, rules)
    prompt, expected = ar_reference(target, media(media_name), text, config)
    if media_name is not None:
        assert prompt.media_spans  # the media really went in
    wrong_at = {2, 3 + k, 9}
    for method in ("flash", "eagle"):
        random = run(target, prompt, method, make_draft(target, k=k, num_latents=num_latents, seed=k), config)
        assert_same_tokens(target, prompt, config.rules, expected, random.tokens, f"random {method} k={k}")
        scripted = make_draft(target, k=k, num_latents=num_latents, cls=ScriptedDraft, script=expected,
                              wrong_at=wrong_at)
        events = run_events(target, prompt, method, scripted, config)
        assert_same_tokens(target, prompt, config.rules, expected, collect(events).tokens, f"scripted {method} k={k}")
        check_scripted_run(events, expected, k, wrong_at, config.max_new_tokens)
        assert collect(events).accepted > 0
    lookup = run(target, prompt, "pld", None, greedy(target, 20, rules, k=k))
    assert_same_tokens(target, prompt, config.rules, expected, lookup.tokens, f"pld k={k}")


def test_config_k_overrides_the_draft_k(tiny_llava, photos, ar_reference, make_draft):
    """FLASH has one slot per draft token, so it caps k at the draft's; EAGLE's chain takes any k."""
    config = greedy(tiny_llava, 20)
    prompt, expected = ar_reference(tiny_llava, photos["astronaut"], "what is the person holding ?", config)
    draft = make_draft(tiny_llava, k=3, num_latents=4)
    for method, k in (("flash", 6), ("flash", 2), ("eagle", 6), ("eagle", 2)):
        events = run_events(tiny_llava, prompt, method, draft, greedy(tiny_llava, 20, k=k))  # checks proposed
        assert max(e.proposed for e in events) == (min(k, 3) if method == "flash" else k)
        assert collect(events).tokens == expected, (method, k)


@pytest.mark.parametrize("target_fixture", ["tiny_llava", "tiny_qwen"])
def test_reduced_vocabulary_draft_is_lossless(request, photos, ar_reference, make_draft, target_fixture):
    """A draft over a subset of the vocabulary (its q is zero elsewhere) changes nothing but speed."""
    target = request.getfixturevalue(target_fixture)
    config = greedy(target, 20)
    prompt, expected = ar_reference(target, photos["rocket"], "describe the image in detail", config)
    # A scattered subset (not the first ids) that holds half of plain decoding's tokens.
    scattered = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(0))[:60]
    subset = sorted(set(expected[::2]) | set(scattered.tolist()))
    draft = make_draft(target, k=4, num_latents=4, draft_vocab=torch.tensor(subset))
    for method in ("flash", "eagle"):
        events = run_events(target, prompt, method, draft, config)
        assert all(t in subset for e in events[1:] for t in e.tokens[: e.accepted])  # accepted = proposed
        assert_same_tokens(target, prompt, config.rules, expected, collect(events).tokens, f"reduced-vocab {method}")
    run_events(target, prompt, "flash", draft, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=1))


def test_rules_banning_the_whole_draft_vocabulary_do_not_crash_sampling(tiny_llava, make_draft):
    target = tiny_llava
    prompt = build_prompt(target, None, "the sky is")
    config = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=0, rules=LogitsRules(no_repeat_ngram_size=1))
    # Both loops draw the first token first from the same seed: it is the same token.
    first = run(target, prompt, "ar", None, replace(config, max_new_tokens=1)).tokens[0]
    # The draft's whole vocabulary is that token, which the 1-gram ban forbids from then on.
    draft = make_draft(target, k=2, num_latents=0, draft_vocab=torch.tensor([first]))
    # Not run_events: a fix may rightly propose fewer than k tokens when nothing is left to propose.
    result = collect(generate(target, prompt, "flash", draft, config))
    assert result.tokens[0] == first
    assert len(result.tokens) == config.max_new_tokens or result.tokens[-1] in target.eos_token_ids


# --- sampling: the law of the output is the target's ----------------------------------------------

SAMPLE_TOKENS = 4  # the first step drafts 2 tokens (room - 1), so positions 1 and 2 come from verification
COMPARED = ((0,), (1,), (2,), (0, 1), (1, 2))  # per-position marginals and adjacent joints


@pytest.fixture(scope="module")
def peaked_llava():
    """A private tiny LLaVA with its LM head scaled x6: at temperature 1 its next-token entropy is
    ~2 nats (the random init is near-uniform over 384 tokens, where histograms say nothing)."""
    tiny = pytest.importorskip("flash.targets.tiny")
    target = tiny.tiny_llava(0)
    with torch.no_grad():
        target.model.lm_head.weight.mul_(6.0)
    return target


@torch.inference_mode()
def exact_law(target: TargetModel, prompt: Prompt, config: GenerationConfig,
              floor: float = 1e-5) -> tuple[dict[tuple[int, ...], torch.Tensor], float]:
    """The law of the first three tokens by plain decoding, for each of COMPARED (joints flattened
    to ``a * V + b``), and the mass of the prefixes below ``floor`` that were not expanded."""
    vocab = target.vocab_size
    pre = target.prefill(prompt)
    base = pre.state.length

    def probs_after(prefix: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
        logits = config.rules.apply(logits[None], list(prefix), len(prefix))[0]
        return logits_to_probs(logits, config.temperature, config.top_p).double()

    def logits_after(token: int) -> torch.Tensor:
        return target.forward(pre.state, torch.tensor([[token]], device=target.device))[0][-1]

    first = probs_after((), pre.last_logits)
    joint01 = torch.zeros(vocab, vocab, dtype=torch.float64)
    joint12 = torch.zeros(vocab, vocab, dtype=torch.float64)
    for t0 in (first >= floor).nonzero().flatten().tolist():
        joint01[t0] = first[t0] * probs_after((t0,), logits_after(t0))
        for t1 in (joint01[t0] >= floor).nonzero().flatten().tolist():
            joint12[t1] += joint01[t0, t1] * probs_after((t0, t1), logits_after(t1))
            target.crop(pre.state, base + 1)
        target.crop(pre.state, base)
    law = {(0,): first, (1,): joint01.sum(0), (2,): joint12.sum(0), (0, 1): joint01.flatten(),
           (1, 2): joint12.flatten()}  # fmt: skip
    return law, max(0.0, 1.0 - float(joint12.sum()))


def empirical(samples: torch.Tensor, positions: tuple[int, ...], vocab: int) -> torch.Tensor:
    """Counts of ``samples`` [n, 3] at ``positions``, flattened like :func:`exact_law`."""
    index = samples[:, positions[0]]
    for i in positions[1:]:
        index = index * vocab + samples[:, i]
    return torch.bincount(index, minlength=vocab ** len(positions)).double()


def tv_bound(law: torch.Tensor, n: int, delta: float = 1e-3) -> float:
    """A bound on TV(empirical of n samples, law) holding with probability 1 - delta.

    E|p_hat - p| <= min(sd, 2p) per cell; TV moves by at most 1/n per sample, so McDiarmid adds
    sqrt(ln(1/delta) / 2n).
    """
    mean = 0.5 * torch.minimum((law * (1 - law) / n).sqrt(), 2 * law).sum()
    return float(mean) + math.sqrt(math.log(1 / delta) / (2 * n))


def chi2_pooled(law: torch.Tensor, counts: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson chi-square over the cells expecting >= min_expected counts, the rest pooled into one."""
    n = float(counts.sum())
    big = law * n >= min_expected
    observed = torch.cat([counts[big], (n - counts[big].sum()).reshape(1)])
    expected = torch.cat([law[big] * n, (n - (law[big] * n).sum()).reshape(1)])
    if expected[-1] < min_expected:  # too little left to pool: fold it into the last big cell
        observed = torch.cat([observed[:-2], observed[-2:].sum().reshape(1)])
        expected = torch.cat([expected[:-2], expected[-2:].sum().reshape(1)])
    return float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1


def chi2_critical(dof: int, z: float = 4.5) -> float:
    """Chi-square quantile at standard-normal score z (Wilson-Hilferty; z = 4.5: p ~ 3e-6)."""
    c = 2 / (9 * dof)
    return dof * (1 - c + z * math.sqrt(c)) ** 3


def sample_runs(target, prompt, method, draft, config: GenerationConfig, seeds: range):
    """The first three tokens of one run per seed ([n, 3]), and the accepted / proposed totals."""
    samples, accepted, proposed = [], 0, 0
    for seed in seeds:
        result = collect(generate(target, prompt, method, draft, replace(config, seed=seed)))
        assert len(result.tokens) >= 3, "a run ended before the compared positions"
        samples.append(result.tokens[:3])
        accepted, proposed = accepted + result.accepted, proposed + result.proposed
    return torch.tensor(samples), accepted, proposed


def assert_law(law: dict, dropped: float, samples: torch.Tensor, vocab: int, label: str) -> None:
    n = samples.shape[0]
    for positions in COMPARED:
        counts = empirical(samples, positions, vocab)
        tv = 0.5 * float((counts / n - law[positions]).abs().sum())
        bound = tv_bound(law[positions], n) + dropped
        assert tv < bound, f"{label}, positions {positions}: TV {tv:.4f} >= {bound:.4f}"
        chi2, dof = chi2_pooled(law[positions], counts)
        assert chi2 < chi2_critical(dof), f"{label}, positions {positions}: chi2 {chi2:.1f} on {dof} dof"


PENALTIES = LogitsRules(repetition_penalty=1.5, no_repeat_ngram_size=2)
SAMPLING_CASES = [
    # method, temperature, top_p, rules (None: the target's own), samples
    ("flash", 1.0, 1.0, None, 600),
    ("flash", 1.0, 1.0, PENALTIES, 600),  # rules see each verified row's exact prefix, drafts' included
    ("flash", 1.0, 0.8, None, 1500),  # the most samples: top-p makes q's bookkeeping easiest to get wrong
    ("eagle", 0.8, 0.9, None, 500),
    ("flash-tree", 1.0, 0.8, None, 600),  # siblings drawn without replacement, checked in turn
    ("flash-tree", 1.0, 1.0, PENALTIES, 600),  # each sibling's q and each row's p after its own path
]


@pytest.mark.parametrize("method,temperature,top_p,rules,samples", SAMPLING_CASES,
                         ids=["flash-T1", "flash-T1-penalties", "flash-T1-top_p0.8", "eagle-T0.8-top_p0.9",
                              "flash-tree-T1-top_p0.8", "flash-tree-T1-penalties"])
def test_sampling_has_the_target_law(peaked_llava, photos, make_echo_draft, method, temperature, top_p, rules,
                                     samples):
    target, vocab = peaked_llava, peaked_llava.vocab_size
    prompt = build_prompt(target, photos["chelsea"], "describe the cat")
    config = GenerationConfig(max_new_tokens=SAMPLE_TOKENS, temperature=temperature, top_p=top_p,
                              rules=target.logits_rules() if rules is None else rules)
    law, dropped = exact_law(target, prompt, config)
    assert dropped < 0.01
    label = f"{method} T={temperature} top_p={top_p} rules={config.rules}"

    draft = make_echo_draft(target, k=3, num_latents=4)
    spec, accepted, proposed = sample_runs(target, prompt, method, draft, config, range(samples))
    assert 0 < accepted < proposed  # both acceptance and rejection (the residual) were exercised
    assert_law(law, dropped, spec, vocab, label)

    # Plain sampling (other seeds) has the same law, and its histograms agree with the speculative ones.
    plain, _, _ = sample_runs(target, prompt, "ar", None, config, range(10**6, 10**6 + samples // 3))
    assert_law(law, dropped, plain, vocab, f"ar {label}")
    for positions in COMPARED:
        spec_freq = empirical(spec, positions, vocab) / spec.shape[0]
        plain_freq = empirical(plain, positions, vocab) / plain.shape[0]
        tv = 0.5 * float((spec_freq - plain_freq).abs().sum())
        bound = tv_bound(law[positions], spec.shape[0]) + tv_bound(law[positions], plain.shape[0]) + dropped
        assert tv < bound, f"{label}, positions {positions}: TV({method}, ar) {tv:.4f} >= {bound:.4f}"


def test_sampled_tree_with_a_confidence_cut_has_the_target_law(peaked_llava, photos, make_echo_draft):
    """The sampled tree stops its chain where the product of each level's top draft probability falls
    below ``min_draft_prob``: a decision read from q alone, never from a drawn token, so the law holds."""
    target, vocab = peaked_llava, peaked_llava.vocab_size
    prompt = build_prompt(target, photos["chelsea"], "describe the cat")
    config = GenerationConfig(max_new_tokens=SAMPLE_TOKENS, temperature=1.0, rules=PENALTIES, min_draft_prob=0.3)
    law, dropped = exact_law(target, prompt, config)
    assert dropped < 0.01
    samples = 600
    spec, accepted, proposed = sample_runs(target, prompt, "flash-tree", make_echo_draft(target, k=3, num_latents=4),
                                           config, range(samples))
    assert 0 < accepted < proposed
    assert proposed < config.tree.nodes * samples  # the cut bit: an uncut first step alone proposes 4 per run
    assert_law(law, dropped, spec, vocab, f"flash-tree cut {config.min_draft_prob}")


def test_the_loop_clock_waits_for_every_gpu(monkeypatch):
    """On CUDA the clock syncs every GPU before reading the time (a target split over GPUs, or a draft on
    another one, queues work the current device's sync would not wait for); on CPU it syncs nothing."""
    from flash.engine.events import Clock

    synced = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda index=None: synced.append(index))
    Clock(torch.device("cuda", 0)).lap()
    assert synced == [0, 1, 2, 0, 1, 2]  # at the start mark and at the lap
    synced.clear()
    Clock(torch.device("cpu")).lap()
    assert synced == []
