"""The command line, run as a user runs it (subprocesses), plus the lossless check on every example."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flash.engine import GenerationConfig, collect, generate
from flash.media import load_media
from flash.models import load_draft
from flash.targets.embedded import QWEN_TARGET_NAME, SMOLLM2_TARGET_NAME

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "assets" / "examples").iterdir())
# Tests of the command line's own behaviour run the smaller embedded model (it loads and decodes ~2.5x
# faster); the default model runs in the tests that are about it (the JSON's model, the race replay).
SMALL = ("--model", "smollm2")


def flash_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flash", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_caption_json_shape():
    proc = flash_cli("caption", "assets/examples/cat.jpg", "--json", "--max-new-tokens", "12", "--method", "flash")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in ("text", "tokens", "method", "new_tokens", "seconds", "tokens_per_s", "steps", "tau",
                "acceptance_rate"):
        assert key in out
    assert out["method"] == "flash" and out["new_tokens"] == len(out["tokens"]) <= 12
    assert out["model"] == QWEN_TARGET_NAME  # the default model
    assert out["text"] and out["tokens_per_s"] > 0 and out["tau"] >= 1


@pytest.mark.parametrize("extra,method", [((), "flash-tree"), (("--temperature", "0.7"), "flash-tree")])
def test_caption_defaults_to_the_app_s_flash_variant(extra, method):
    # The app's race runs the draft tree for greedy and sampling requests alike; so does the CLI.
    proc = flash_cli("caption", "assets/examples/cat.jpg", "--json", "--max-new-tokens", "6", *SMALL, *extra)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["method"] == method


def test_caption_streams_plain_text():
    proc = flash_cli("caption", "assets/examples/coffee.jpg", "--max-new-tokens", "8", "--method", "ar", *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "tokens/s" in proc.stderr


@pytest.mark.parametrize("content,name", [(b"hello, I am text", "fake.mp4"), (b"", "empty.jpg"),
                                          (b"\xff\xd8\xff\xe0garbage", "broken.jpg")])
def test_bad_input_is_one_line_exit_2(tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(content)
    proc = flash_cli("caption", str(path), "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_missing_file_and_bad_settings(tmp_path):
    proc = flash_cli("caption", str(tmp_path / "nope.png"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    proc = flash_cli("caption", "assets/examples/cat.jpg", "--max-new-tokens", "0")
    assert proc.returncode == 2 and "max_new_tokens" in proc.stderr
    proc = flash_cli("caption", "assets/examples/cat.jpg", "--draft", str(tmp_path), *SMALL)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    proc = flash_cli("train", "--out", str(tmp_path / "d"), "--distill-only", "--shard", "2/2")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --shard must look like I/N")


# Each case: argv, then a piece of its one-line error ("" for --help, which exits 0).
_CHECKED_BEFORE_TORCH = [
    (["--help"], ""),
    (["caption", "nope.png"], "nope.png"),
    (["caption", "assets/examples/cat.jpg", "--top-p", "2"], "top_p"),
    (["race", "assets/examples/cat.jpg", "--video", "x.gif"], ".mp4"),
    (["bench", "nope.png"], "nope.png"),
    (["bench", str(ROOT / "assets/examples/cat.jpg"), "--compare-draft", "no/such/draft"], "no/such/draft"),
    (["bench", str(ROOT / "assets/examples/cat.jpg"), "--methods", "ar", "--compare-draft",
      str(ROOT / "assets/drafts/qwen2.5")], "draft method"),
    (["caption-eval", "--json", "missing/r.json"], "folder does not exist"),
    (["train", "--out", "d", "--lr", "-1"], "lr"),
    (["train", "--out", "d", "--shard", "2/2"], "--shard"),
    (["doctor", "--tiny", "llava", "--model", "x/y"], "not both"),
    (["doctor", "--media", "nope.png"], "nope.png"),
]


@pytest.mark.parametrize("argv,message", _CHECKED_BEFORE_TORCH,
                         ids=[" ".join(a).replace(f"{ROOT}/", "") for a, _ in _CHECKED_BEFORE_TORCH])
def test_help_and_bad_input_answer_before_torch_loads(tmp_path, argv, message):
    """--help and input the CLI can check itself are answered before torch and transformers are imported
    (~2.5 s on a 2-core machine): the command runs in a fresh interpreter that reports whether either
    was imported. A bad training setting (--lr -1) also used to be a traceback after the model's load."""
    probe = ("import sys\nfrom flash.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    rc = e.code\nprint('IMPORTED', rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.strip().splitlines()[-1] == f"IMPORTED {0 if not message else 2} []", proc.stdout + proc.stderr
    if message:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_bench_refuses_unwritable_reports_before_running(tmp_path):
    # A benchmark runs for minutes: a report it could not write must be refused first, in one line.
    cases = [("--json", str(tmp_path / "missing" / "b.json"), "folder does not exist"),
             ("--json", str(tmp_path), "it is a folder"),
             ("--plot", str(tmp_path / "b.txt"), ".html")]
    if importlib.util.find_spec("kaleido") is None:
        cases.append(("--plot", str(tmp_path / "b.png"), "kaleido"))
    for flag, path, message in cases:
        proc = flash_cli("bench", "assets/examples/cat.jpg", flag, path, timeout=60)
        assert proc.returncode == 2 and proc.stdout == "", (flag, path, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_bench_refuses_bad_media_before_loading_the_model(tmp_path):
    # The media are checked first: with a model id that cannot load, the error must still be the media's
    # (it used to come after the model's load, ~15 s, for a typo in a path).
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (tmp_path / "empty").mkdir()
    for media, message in ((["assets/examples/cat.jpg", str(tmp_path / "nope.png")], "nope.png"),
                           (["assets/examples/cat.jpg", str(tmp_path / "broken.jpg")], "broken.jpg"),
                           ([str(tmp_path / "empty")], "no media files found")):
        proc = flash_cli("bench", *media, "--model", str(tmp_path / "no-such-model"), timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_caption_eval_refuses_an_unwritable_report_before_running(tmp_path):
    # caption-eval captions ten photos first (a minute or two): its --json path is checked up front too.
    for path, message in ((tmp_path / "missing" / "r.json", "folder does not exist"), (tmp_path, "it is a folder")):
        proc = flash_cli("caption-eval", "--json", str(path), timeout=60)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_train_refuses_conflicting_flags_in_one_line(tmp_path):
    for flags, message in ((["--epochs", "2", "--train-minutes", "5"], "not both"),
                           (["--distill-minutes", "-1"], "must be >= 0"),
                           (["--class-items", "5", "--media", str(tmp_path)], "without --media"),
                           (["--class-items", "5", "--model", "llava-hf/llava-1.5-7b-hf"], "embedded models only")):
        proc = flash_cli("train", "--out", str(tmp_path / "draft"), *flags, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_train_refuses_a_bad_init_from_before_reading_records(tmp_path):
    """--init-from is checked first: a path with no draft, or a draft of another model, fails in one line
    before the records (gigabytes for a real run) are read or anything is distilled."""
    from flash.draft import DraftConfig, FlashDraft

    FlashDraft(DraftConfig(target_name="some-other-model", hidden_size=32, vocab_size=64, num_heads=4,
                           intermediate_size=64, k=2, num_latents=2)).save(tmp_path / "other")
    empty = tmp_path / "no-records"
    empty.mkdir()
    for init, message in ((tmp_path / "missing", "cannot load a draft"), (tmp_path / "other", "some-other-model")):
        proc = flash_cli("train", "--train-only", "--data-dir", str(empty), "--out", str(tmp_path / "d"),
                         "--init-from", str(init), "--model", "smollm2", timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
        assert "no distilled records" not in proc.stderr and "Traceback" not in proc.stderr


def test_train_first_item_distils_only_the_later_corpus_items(tmp_path):
    """``--first-item`` skips the training items an earlier draft already learnt from; the held-out
    split is always distilled (every evaluation needs it); ``--class-items`` adds labelled items, asking
    the model's default request."""
    import json

    from safetensors import safe_open

    data = tmp_path / "data"
    proc = flash_cli("train", "--out", str(tmp_path / "draft"), "--data-dir", str(data), "--distill-only",
                     "--train-items", "3", "--first-item", "2", "--heldout-items", "1", "--max-new-tokens", "4",
                     "--class-items", "1", *SMALL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(path.name for path in data.glob("*.safetensors"))
    train = [name for name in written if name.startswith("train-")]
    assert train == ["train-00002-greedy.safetensors", "train-00002-sampled.safetensors"]
    assert [name for name in written if name.startswith("class-")] == \
        ["class-00000-greedy.safetensors", "class-00000-sampled.safetensors"]
    with safe_open(str(data / "class-00000-greedy.safetensors"), "pt") as fh:
        prompt = json.loads(fh.metadata()["meta"])["prompt"]
    assert prompt in ("Describe this image in detail.", "Describe what happens in this video.")  # SmolLM2's
    assert len(written) == 5  # plus the held-out item's greedy answer


def test_train_distils_the_user_s_media_folder(tmp_path):
    """``--media``: every readable file is a corpus item (a bad one is skipped with a message), items
    keep only their path (frames are decoded again when distilled), and records keep each kind."""
    from flash.cli_train import _user_corpus
    from flash.training.corpus import MediaFileItem
    from flash.training.distill import load_records

    media = tmp_path / "media" / "nested"
    media.mkdir(parents=True)
    for name in ("cat.jpg", "coffee_pan.mp4"):
        (media / name).write_bytes((ROOT / "assets" / "examples" / name).read_bytes())
    (media / "notes.mp4").write_text("not a video")
    items = _user_corpus([str(tmp_path / "media")], seed=0)
    assert [type(i) for i in items] == [MediaFileItem, MediaFileItem]
    assert [(i.path.name, i.kind, i.frame_count) for i in items] == [("cat.jpg", "image", 1),
                                                                    ("coffee_pan.mp4", "video", 8)]
    assert items[1].media.kind == "video" and len(items[1].media.frames) == 8
    data = tmp_path / "data"
    proc = flash_cli("train", "--media", str(tmp_path / "media"), "--out", str(tmp_path / "draft"),
                     "--data-dir", str(data), "--distill-only", "--max-new-tokens", "3", *SMALL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping" in proc.stderr and "notes.mp4" in proc.stderr
    records = load_records(data, SMOLLM2_TARGET_NAME)
    assert sorted(r.kind for r in records) == ["image", "image", "video", "video"]  # greedy + sampled each
    assert {r.split for r in records} == {"train"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_flash_equals_ar_on_every_example(smollm2_target, path):
    """The issue's acceptance check, in-process: greedy flash (chain and tree) and ar give identical tokens."""
    media = load_media(path)
    draft = load_draft(smollm2_target, quiet=True)
    prompt = smollm2_target.build_prompt(media, smollm2_target.default_prompt(media))
    cfg = GenerationConfig(max_new_tokens=64, rules=smollm2_target.logits_rules())
    ar = collect(generate(smollm2_target, prompt, "ar", None, cfg))
    for method in ("flash", "flash-tree", "eagle", "pld"):
        out = collect(generate(smollm2_target, prompt, method, draft, cfg))
        assert out.tokens == ar.tokens, (method, out.tokens, ar.tokens)


def test_load_draft_binds_each_target_object(smollm2_target):
    """The draft cache is per target object: a second object with the same name gets its own binding."""
    import copy

    other = copy.copy(smollm2_target)  # same name, another object (e.g. the same model loaded twice)
    other.embed = lambda ids: smollm2_target.embed(ids) * 0  # observable: a different embedding
    mine, theirs = load_draft(smollm2_target, quiet=True), load_draft(other, quiet=True)
    assert mine is load_draft(smollm2_target, quiet=True)  # cached
    assert theirs is not mine and theirs._embed == other.embed and mine._embed == smollm2_target.embed


def test_race_writes_a_replay_for_slides(tmp_path):
    import av
    from PIL import Image

    video, gif, card = tmp_path / "race.mp4", tmp_path / "race.gif", tmp_path / "card.png"
    proc = flash_cli("race", "assets/examples/cat.jpg", "--max-new-tokens", "8", "--json", "--video", str(video),
                     "--gif", str(gif), "--card", str(card))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["identical"] is True and summary["text"] and summary["flash"]["new_tokens"] <= 8
    with av.open(str(video)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    for path, kind in ((gif, "GIF"), (card, "PNG")):
        with Image.open(path) as image:
            assert image.format == kind and image.size == (1280, 720)


def test_race_refuses_a_wrong_file_name_before_racing(tmp_path):
    path = tmp_path / "race.avi"
    proc = flash_cli("race", "assets/examples/cat.jpg", "--video", str(path))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: cannot write {path}: give a .mp4 file name"
