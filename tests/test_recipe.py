"""The one-command recipe for the default model's draft (``scripts/train_default_draft.sh``, docs/training.md),
run for real at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from flash.draft import FlashDraft
from flash.training.distill import load_records

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_one_command_recipe_distils_with_two_processes_and_trains(tmp_path, smollm2_target):
    out, data = tmp_path / "draft", tmp_path / "data"
    env = {**os.environ, "MINUTES": "0", "ITEMS": "2", "HELDOUT": "1", "EPOCHS": "1", "MAX_NEW_TOKENS": "8"}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "train_default_draft.sh"), str(out), str(data)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    records = load_records(data, smollm2_target.name)
    # Two training items answered greedy and sampled, one held-out item greedy; both shards wrote.
    assert sorted(r.split for r in records) == ["heldout", "train", "train", "train", "train"]
    log = json.loads((out / "training_log.json").read_text())
    assert log["config"]["rules_ce"] is True and len(log["history"]) == 1
    assert log["history"][0]["heldout"]  # held-out τ was measured
    draft = FlashDraft.load(out).bind(smollm2_target)
    assert draft.cfg.target_name == smollm2_target.name
    assert "recipe done" in run.stderr


@pytest.mark.slow
def test_the_recipe_sized_by_the_clock_stops_distilling_and_trains_for_what_is_left(tmp_path, smollm2_target):
    """MINUTES: distillation stops making training records at DISTILL_SHARE of the time (held-out ones
    are always made), and training runs for what is left (here the 0.2-minute floor)."""
    out, data = tmp_path / "draft", tmp_path / "data"
    env = {**os.environ, "MINUTES": "1.2", "ITEMS": "1000", "HELDOUT": "1", "MAX_NEW_TOKENS": "8"}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "train_default_draft.sh"), str(out), str(data)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("distill: time is up") == 2  # both shards stopped short of their 400 items
    splits = [r.split for r in load_records(data, smollm2_target.name)]
    assert splits.count("heldout") == 1 and 0 < splits.count("train") < 2000, splits.count("train")
    log = json.loads((out / "training_log.json").read_text())
    assert log["config"]["minutes"] == 0.2 and log["config"]["rules_ce"] is True
    assert log["history"] and log["history"][-1]["heldout"]
    assert log["history"][-1]["seconds"] >= 12
    assert "recipe done" in run.stderr


def test_the_recipe_refuses_a_time_that_is_not_a_number(tmp_path):
    for name, value in (("MINUTES", "an hour"), ("DISTILL_SHARE", "1.5"), ("DISTILL_SHARE", "0")):
        run = subprocess.run(["bash", str(ROOT / "scripts" / "train_default_draft.sh"), str(tmp_path / "d")],
                             cwd=ROOT, env={**os.environ, name: value}, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith(f"error: {name}")
    assert not (tmp_path / "d").exists()
