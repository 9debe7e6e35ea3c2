"""The benchmark: a smoke run of the CLI (shape of the output only: benchmarks are not timed tests), and
the pairing of two drafts in one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_decoding import ScriptedDraft, greedy

from flash.bench import Sample, markdown_table, run_benchmark
from flash.engine import collect, generate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_cli_writes_table_json_and_plot(tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.html"
    proc = subprocess.run([sys.executable, "-m", "flash", "bench", "assets/examples/cat.jpg",
                           "assets/examples/coffee_pan.mp4", "--max-new-tokens", "8", "--warmup", "1",
                           "--json", str(out), "--compare-draft", "assets/drafts/qwen2.5",
                           "--plot", str(plot)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| all | flash |" in proc.stdout and "Machine:" in proc.stdout
    report = json.loads(out.read_text())
    for method in ("ar", "eagle", "flash", "flash-tree", "pld"):
        agg = report["methods"][method]
        for key in ("tokens_per_s", "speedup", "tau", "acceptance_rate", "time_split", "identical"):
            assert key in agg
        assert agg["identical"] is True
    assert report["methods"]["ar"]["speedup"] == 1.0
    assert set(report["by_kind"]) == {"image", "video"}
    assert report["machine"]["torch"] and report["machine"]["cpu_isa"] and report["mismatches"] == []
    # The shipped draft again, as a compared draft: each draft method runs a second time, with the same τ.
    for method in ("eagle", "flash", "flash-tree"):
        assert report["methods"][f"{method}@qwen2.5"]["tau"] == report["methods"][method]["tau"]
    assert [ab["versus"] for ab in report["draft_ab"]] == ["eagle@qwen2.5", "flash@qwen2.5", "flash-tree@qwen2.5"]
    assert len(report["samples"]) == 2 * 8
    assert "plotly" in plot.read_text()[:5000].lower()


def test_compare_draft_runs_each_draft_interleaved_and_pairs_them(tiny_llava, photos, make_draft):
    target, text = tiny_llava, "describe the cat"
    config = greedy(target, 20)
    prompt = target.build_prompt(photos["chelsea"], text)
    expected = collect(generate(target, prompt, "ar", None, config)).tokens
    random = make_draft(target, k=3, seed=1)
    scripted = make_draft(target, k=3, cls=ScriptedDraft, script=expected, wrong_at={5})
    report = run_benchmark(target, random, [Sample("chelsea", photos["chelsea"], text)], ["flash"], config,
                           repeats=2, log=lambda _: None, compare_drafts={"scripted": scripted})
    assert list(report["methods"]) == ["ar", "flash", "flash@scripted"]
    assert all(agg["identical"] for agg in report["methods"].values()) and report["mismatches"] == []
    # Each label ran with its own draft: the steps that draft takes on its own, in every repeat.
    steps = {}
    for label, draft in (("flash", random), ("flash@scripted", scripted)):
        steps[label] = collect(generate(target, prompt, "flash", draft, config)).steps
        assert [r["steps"] for r in report["samples"] if r["method"] == label] == [steps[label]] * 2
    assert steps["flash@scripted"] < steps["flash"]  # the scripted draft is right on all but one token
    (ab,) = report["draft_ab"]
    assert (ab["method"], ab["versus"], ab["runs"]) == ("flash", "flash@scripted", 2)
    taus = report["methods"]["flash"]["tau"], report["methods"]["flash@scripted"]["tau"]
    assert (ab["tau"], ab["tau_versus"]) == taus
    rate = {(r["method"], r["repeat"]): r["tokens_per_s"] for r in report["samples"]}
    paired = sorted(rate["flash@scripted", i] / rate["flash", i] for i in range(2))
    assert (ab["ratio_min"], ab["ratio_max"]) == pytest.approx(tuple(paired))
    assert report["config"]["compare_drafts"]["scripted"]["k"] == 3
    assert "flash@scripted vs flash: ×" in markdown_table(report)
