"""The research probes the docs quote (``research/*.py``), run for real on a tiny distillation cache.

Not part of the default test run (``testpaths`` is ``tests``): ``python -m pytest -q research/tests``.

Each runs as a user runs it (a subprocess) with ``$FLASH_CACHE`` pointing at a temporary cache that
borrows the real weights and holds a few freshly distilled records of the default model, and must
print well-formed numbers. ``draft_probes.py``'s probes need the built-in corpus's first 400 training
records (hours of distillation), so only its ``--extract`` step is run, in process, on one corpus item.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flash.training.corpus import CorpusItem, build_corpus
from flash.training.distill import distill, load_record, load_records
from flash.weights import cache_dir

ROOT = Path(__file__).resolve().parent.parent.parent
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


@pytest.fixture(scope="module")
def script_cache(tmp_path_factory, smollm2_target, photos, videos) -> Path:
    """A ``$FLASH_CACHE`` with the real weights (linked) and 2 held-out + 1 training records of SmolLM2 (the
    smaller embedded model: the scripts run ``--model smollm2``)."""
    root = tmp_path_factory.mktemp("flash-cache")
    for name in ("weights", "smollm2-135m-instruct", "kernels"):  # kernels: no second ~20 s compile
        if (cache_dir() / name).exists():
            (root / name).symlink_to(cache_dir() / name)
    items = [CorpusItem("heldout-cat", photos["chelsea"], "Describe this photo.", "heldout"),
             CorpusItem("heldout-pan", videos["coffee-pan-3"], "What happens in this video?", "heldout"),
             CorpusItem("train-rocket", photos["rocket"], "Describe this photo.", "train")]
    distill(smollm2_target, items, root / "distill" / "smollm2", max_new_tokens=12, batch_size=4)
    assert len(load_records(root / "distill" / "smollm2", smollm2_target.name)) == 4  # train: greedy + sampled
    return root


def run_script(name: str, cache: Path, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "FLASH_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(ROOT / "research" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def rates(line: str) -> list[float]:
    return [float(x) for x in re.findall(NUMBER, line)]


def half_unit(printed: str) -> float:
    """How far a printed number can be from the value it rounds: half its last digit."""
    decimals = len(printed.partition(".")[2])
    return 0.5 * 10.0**-decimals


def ratio_is_consistent(numerator: str, denominator: str, ratio: str) -> bool:
    """Whether the printed ``ratio`` can be the rounded quotient of the values the other two printed
    numbers round (positive values): the quotient's interval, widened by the ratio's own rounding.

    A fixed tolerance is wrong either way: |3.0 / 0.673 - 4.455| = 0.00265 from rounding alone, as a
    small denominator magnifies the numerator's and its own rounding.
    """
    num, den, value = float(numerator), float(denominator), float(ratio)
    num_half, den_half = half_unit(numerator), half_unit(denominator)
    assert den - den_half > 0, denominator
    low, high = (num - num_half) / (den + den_half), (num + num_half) / (den - den_half)
    slack = half_unit(ratio) + 1e-9  # 1e-9: the float parsing of decimal strings
    return low - slack <= value <= high + slack


def test_rules_gap_reports_three_rates(script_cache):
    out = run_script("rules_gap.py", script_cache, "--model", "smollm2").splitlines()
    assert re.fullmatch(r"2 held-out records, [0-9]+ positions", out[0])
    for line in out[1:4]:
        value = rates(line.split(":")[-1])[0]
        assert 0.0 <= value <= 1.0, line
    buckets = [re.match(r"  \[[0-9.]+, [0-9.]+[])]: ([0-9.]+) of positions, hit ([0-9.]+)$", line)
               for line in out[5:-2]]
    assert buckets and all(buckets), out[5:-2]
    capped = re.match(r"always right where the target's top probability is >= 0.3: slot-0 hit ([0-9.]+), so tau ~ "
                      r"([0-9.]+) with 4 drafts; tau 3.5 needs 0.821, i.e. a hit rate of (-?[0-9.]+) where", out[-2])
    assert capped, out[-2]  # 0.821: 1 + a + a^2 + a^3 + a^4 = 3.500 at a = 0.821 (3.499 at 0.8205, 3.506 at 0.8215)
    # tau ~ 1 + hit + ... + hit^4, the hit printed to 3 decimals and tau to 2: the sum, increasing in the
    # hit, over every hit that rounds to the printed one, widened by tau's own rounding.
    hit, tau = float(capped[1]), float(capped[2])
    assert 0.0 <= hit <= 1.0
    hit_half = half_unit(capped[1])
    low, high = (sum(h**i for i in range(5)) for h in (max(hit - hit_half, 0.0), hit + hit_half))
    assert low - half_unit(capped[2]) - 1e-9 <= tau <= high + half_unit(capped[2]) + 1e-9, (hit, tau)
    assert 0.0 < rates(out[-1].split("acceptance")[1])[0] <= 1.0, out[-1]
    # Every position is in one bucket: the printed shares add up to 1 within their rounding.
    shares = [b.group(1) for b in buckets]
    assert abs(sum(float(s) for s in shares) - 1.0) <= sum(half_unit(s) for s in shares) + 1e-9, shares


def test_printed_ratio_check_allows_rounding_only():
    """The failure #33 reported (3.0 / 0.673 printed as 4.455) is rounding; an off-by-0.01 ratio is not."""
    assert ratio_is_consistent("3.000", "0.673", "4.455") and ratio_is_consistent("1.500", "1.000", "1.500")
    assert not ratio_is_consistent("3.000", "0.673", "4.470") and not ratio_is_consistent("1.500", "1.000", "1.502")
    assert half_unit("4.455") == 0.0005 and half_unit("2.5") == 0.05 and half_unit("3") == 0.5


def test_vocab_gain_evaluates_each_size(script_cache):
    out = run_script("vocab_gain.py", script_cache, "--model", "smollm2", "--sizes", "8192").splitlines()
    assert "held-out records" in out[0] and "4096-token vocabulary" in out[0]
    sizes = [int(m.group(1)) for line in out[1:] if (m := re.match(r"vocabulary ([0-9]+):", line))]
    assert sizes == [4096, 8192, 49152]
    for line in out[1:]:
        taus = [float(t) for t in re.findall(r"tau " + NUMBER, line)]
        assert len(taus) == 2 and all(1.0 <= t <= 5.0 for t in taus), line  # image and video records


def test_tree_gain_predicts_chain_and_trees(script_cache):
    out = run_script("tree_gain.py", script_cache, "--model", "smollm2")
    costs = dict(re.findall(r"([0-9]+):([0-9.]+)", out.splitlines()[0]))
    assert sorted(int(n) for n in costs) == list(range(1, 14)) and float(costs["1"]) == 1.0
    rows = re.findall(r"τ ([0-9.]+)\s+cost ([0-9.]+)\s+speed ([0-9.]+)", out)
    assert len(rows) == 3 + 3 * 6  # three chain cuts, three tree cuts x six sizes
    for tau, cost, speed in rows:  # speed = τ / cost, each printed to 3 decimals
        assert 1.0 <= float(tau) <= 5.0 and ratio_is_consistent(tau, cost, speed), (tau, cost, speed)


def test_sampler_cost_times_both_filters(script_cache):
    # The script itself asserts the two filters agree.
    out = run_script("sampler_cost.py", script_cache, "--model", "smollm2")
    timed = re.findall(r"^([15]) row\(s\), median ms: .*", out, flags=re.M)
    assert timed == ["1", "5"]
    for line in out.splitlines()[1:]:
        assert len(rates(line.split("median ms:")[1])) == 4, line


def test_verify_cost_and_profile_step_run(script_cache):
    out = run_script("verify_cost.py", script_cache)
    settings = ("lean", "lean, torch ops", "lean, fbgemm", "transformers")
    rows = re.findall(r"^(\S+) \(context [0-9]+\), (lean|lean, torch ops|lean, fbgemm|transformers)\s+1: [0-9.]+ "
                      r"\(1\.00x\)", out, flags=re.M)
    assert len(rows) == 8 and {r[1] for r in rows} == set(settings)  # 2 contexts x 4
    out = run_script("profile_step.py", script_cache, "--model", "smollm2")
    runs = {m: (int(n), float(tau)) for m, n, tau in
            re.findall(r"^(ar|flash|flash-tree): ([0-9]+) tokens in [0-9]+ steps \(tau ([0-9.]+)\)", out, flags=re.M)}
    assert set(runs) == {"ar", "flash", "flash-tree"}
    assert runs["ar"][1] == 1.0 and runs["flash"][0] == runs["flash-tree"][0] == runs["ar"][0]


def test_pass_profile_lists_each_settings_costliest_ops(script_cache):
    out = run_script("pass_profile.py", script_cache, "assets/examples/cat.jpg", "--passes", "2")
    sections = re.split(r"^(prefill \([0-9]+ positions\)|[15]-token pass|5-token tree pass), ms each .*; "
                        r"[0-9.]+ ms wall clock each .*$", out, flags=re.M)
    assert sections[1::2] == ["prefill (104 positions)", "1-token pass", "5-token pass", "5-token tree pass"]
    for body in sections[2::2]:
        ops = re.findall(r"^  (\S.*?)\s+([0-9.]+)  \(([0-9]+)\)$", body, flags=re.M)
        assert len(ops) == 8 and all(float(ms) >= 0 and int(calls) >= 1 for _, ms, calls in ops)
        assert [float(ms) for _, ms, _ in ops] == sorted((float(ms) for _, ms, _ in ops), reverse=True)


def test_gemm_cost_compares_both_kernels(script_cache):
    out = run_script("gemm_cost.py", script_cache, "--layers", "2").splitlines()
    assert out[0].endswith("FLASH kernel / fbgemm")
    names = [line.split()[0] for line in out[1:-1]]
    assert names == ["qkv", "o", "gate_up", "down", "head", "layer"]
    for line in out[1:-1]:
        cells = re.findall(r"([0-9]+): +([0-9]+) / +([0-9]+)", line)
        assert [int(c[0]) for c in cells] == [1, 2, 4, 5, 8] and all(int(c[1]) > 0 and int(c[2]) > 0 for c in cells)
    assert out[-1].startswith("a step's GEMMs, 2 layers + head, streamed (ms): ")
    cells = re.findall(r"([0-9]+): +([0-9.]+) / +([0-9.]+)", out[-1].split(": ", 1)[1])
    assert [int(c[0]) for c in cells] == [1, 5] and all(float(c[1]) > 0 and float(c[2]) > 0 for c in cells)


def test_kernel_ab_compares_a_revision_with_the_working_tree(script_cache):
    """HEAD's kernels against the working tree's: two real builds, every output compared."""
    out = run_script("kernel_ab.py", script_cache, "HEAD", "--repeats", "3")
    lines = re.findall(r"^(a layer's four GEMMs|decoding attention|default model's (?:prefill|[15]-token pass))"
                       r".*: rev +([0-9.]+) [mu]s, tree +([0-9.]+) [mu]s \(([0-9.]+)x\), same floats: (True|False)$",
                       out, flags=re.M)
    model = ["default model's prefill", "default model's 1-token pass", "default model's 5-token pass"]
    assert [line[0] for line in lines] == ["a layer's four GEMMs"] * 4 + ["decoding attention"] * 4 + model * 2
    assert all(float(rev) > 0 and float(tree) > 0 for _, rev, tree, _, _ in lines)
    # In a clean checkout the two builds are of the same sources; anywhere, a kernel change that moves
    # a float is reported here (the C++ kernels promise fixed summation orders).
    assert all(same == "True" for *_, same in lines) or subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", "flash/cpu/csrc"], cwd=ROOT).returncode != 0


def test_step_split_accounts_for_a_tree_step(script_cache):
    out = run_script("step_split.py", script_cache, "--model", "smollm2", "--rounds", "1", "--max-new-tokens", "24")
    steps = {m: float(ms) for m, ms in re.findall(r"^round 1, (ar|flash-tree): .* ([0-9.]+) ms per step$", out,
                                                      flags=re.M)}
    assert set(steps) == {"ar", "flash-tree"}
    parts = dict(re.findall(r"^  (\S[^\n]*?)\s+(-?[0-9.]+) ms$", out, flags=re.M))
    assert {"target: tree pass", "drafting the tree", "walking the tree (target's rules, choice)",
            "the loop, the rest"} <= set(parts)
    top = [float(v) for k, v in parts.items()]  # the top-level parts and the rest add up to the step
    nested = [float(v) for k, v in re.findall(r"^    (\S[^\n]*?)\s+([0-9.]+) ms$", out, flags=re.M)]
    # Printed rounding only: the step to 0.1 ms (+-0.05), each part to 0.01 ms (+-0.005).
    assert len(nested) == 3 and abs(sum(top) - steps["flash-tree"]) <= 0.05 + 0.005 * len(top) + 1e-9
    assert re.search(r"decoding speed-up here: tau [0-9.]+ x [0-9.]+ / [0-9.]+ = [0-9.]+x", out)


def test_bench_ratios_reads_the_shipped_benchmark():
    out = _run_bench_ratios()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].endswith("bench.json: 21 runs")
    speedups = dict(re.findall(r"([a-z-]+) ([0-9.]+)x", lines[1]))
    assert set(speedups) == {"eagle", "flash", "flash-tree", "pld"} and all(float(v) > 0 for v in speedups.values())
    assert re.search(r"flash-tree ([0-9.]+) / ([0-9.]+)", lines[2])
    assert re.search(r"faster in [0-9]+ of 21", lines[3])
    assert [line.split(",")[0] for line in lines[4:]] == ["  ar"] * 6
    ceilings = [re.search(r"prefill ([0-9]+)% of the run, so at most ([0-9.]+)x end to end; ([0-9.]+)x needs "
                          r"decoding ([0-9.]+|inf)x faster", line) for line in lines[5::3]]
    assert all(ceilings) and [float(m[3]) for m in ceilings] == [2.5, 2.7]
    assert all(float(m[4]) > 1 for m in ceilings)
    # The shipped benchmark's draft has depth 4: an always-right draft emits 5 tokens per pass, which
    # caps it below the prefill-only ceiling.
    perfect = [re.search(r"always right at depth 4 \(5 tokens per pass.*at most ([0-9.]+)x end to end", line)
               for line in lines[6::3]]
    assert all(perfect)
    assert all(1 < float(m[1]) < float(c[2]) for m, c in zip(perfect, ceilings, strict=True))
    bad = _run_bench_ratios(str(ROOT / "README.md"))
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "not a benchmark" in bad.stderr


def _run_bench_ratios(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "research" / "bench_ratios.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_bench_ratios_depth_follows_the_run(tmp_path):
    """The bound's depth is what the FLASH loops drafted: a larger --k than the draft's is capped at the
    draft's k, a smaller one is kept; a benchmark without a draft or --k (``--methods ar pld``) prints no
    bound and does not crash."""
    data = json.loads((ROOT / "docs" / "bench.json").read_text())
    path = tmp_path / "bench.json"
    for k, draft, expected in ((8, data["config"]["draft"], "depth 4 "), (2, data["config"]["draft"], "depth 2 "),
                               (None, None, None)):
        data["config"]["k"], data["config"]["draft"] = k, draft
        path.write_text(json.dumps(data))
        out = _run_bench_ratios(str(path))
        assert out.returncode == 0, out.stderr
        assert "needs decoding" in out.stdout
        bounds = [line for line in out.stdout.splitlines() if "always right" in line]
        assert len(bounds) == (2 if expected else 0) and all(expected in line for line in bounds)


def _bench_ratios():
    """research/bench_ratios.py as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench_ratios", ROOT / "research" / "bench_ratios.py")
    ratios = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ratios)
    return ratios


def test_decoding_speedup_needed_gives_the_goal_back():
    """Amdahl's law read backwards: decoding that much faster, after the same prefill, is the goal exactly."""
    ratios = _bench_ratios()
    for share in (0.0, 0.12, 0.28, 0.35):
        for goal in (1.5, 2.5, 2.7):
            needed = ratios.decoding_speedup_needed(share, goal)
            if share < 1 / goal:
                assert 1 / (share + (1 - share) / needed) == pytest.approx(goal)
            else:
                assert needed == float("inf")
    assert ratios.decoding_speedup_needed(0.0, 2.7) == pytest.approx(2.7)
    assert ratios.decoding_speedup_needed(0.4, 2.7) == float("inf")  # 1 / 0.4 = 2.5 < 2.7


def test_perfect_draft_speedup_is_amdahl_at_the_draft_depth():
    """An always-right depth-k draft shortens decoding k + 1 times (at one step per pass); its bound agrees
    with decoding_speedup_needed, and a dearer pass or a larger prefill share only lowers it."""
    ratios = _bench_ratios()
    assert ratios.perfect_draft_speedup(0.0, 5) == pytest.approx(5)
    assert ratios.perfect_draft_speedup(0.28, 5) == pytest.approx(1 / (0.28 + 0.72 / 5))  # ~2.36: under 2.7
    for share in (0.0, 0.12, 0.28, 0.35):
        for tokens in (2, 5, 9):
            bound = ratios.perfect_draft_speedup(share, tokens)
            assert ratios.decoding_speedup_needed(share, bound) == pytest.approx(tokens)
            assert ratios.perfect_draft_speedup(share, tokens, pass_cost=1.2) < bound
            assert ratios.perfect_draft_speedup(share + 0.05, tokens) < bound


def test_draft_probes_extract_matches_the_records_hidden_states(smollm2_target, tmp_path, monkeypatch, capsys):
    """``--extract`` re-runs a record's prompt + response through the default model's own layers (its
    private pieces: a refactor there must not silently break the probe) and saves layers 3 and 15."""
    spec = importlib.util.spec_from_file_location("draft_probes", ROOT / "research" / "draft_probes.py")
    probes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probes)
    data, out = tmp_path / "distill", tmp_path / "features"
    item = build_corpus(probes.RECORDS // 2, 40, seed=0)[40]  # the first training item, as extract rebuilds it
    distill(smollm2_target, [item], data, max_new_tokens=8, batch_size=2)
    monkeypatch.setattr(probes, "DATA", data)
    probes.extract(smollm2_target, out)
    worst = float(re.search(r"max relative difference ([0-9.]+)", capsys.readouterr().err).group(1))
    assert worst < 0.01  # the teacher-forced last layer is the h the record holds
    for mode in ("greedy", "sampled"):
        name = f"{item.item_id}-{mode}.safetensors"
        hidden = load_record(data / name).hidden
        feats = load_file(str(out / name))
        assert sorted(feats) == ["layer15", "layer3"]
        assert all(f.shape == hidden.shape and f.dtype == torch.float16 for f in feats.values())


def test_sampling_speed_pools_every_method(script_cache, tmp_path):
    out = run_script("sampling_speed.py", script_cache, "--model", "smollm2", "assets/examples/cat.jpg",
                     "--seeds", "2",
                     "--max-new-tokens", "6", "--tree-nodes", "5", "--tree-branch", "3",
                     "--json", str(tmp_path / "runs.json"))
    lines = re.findall(r"^(image|all) (ar|flash|flash-tree): ([0-9.]+) ms per decoded token, x([0-9.]+) vs ar, "
                       r"tau ([0-9.]+), proposed / accepted per pass ([0-9.]+) / ([0-9.]+), 2 runs$", out, flags=re.M)
    assert [(kind, method) for kind, method, *_ in lines] == [
        (kind, method) for kind in ("image", "all") for method in ("ar", "flash", "flash-tree")]
    for _, method, ms, ratio, tau, proposed, accepted in lines:
        assert float(ms) > 0 and float(ratio) > 0 and float(accepted) <= float(proposed)
        if method == "ar":
            assert (float(tau), float(proposed)) == (1.0, 0.0)
        else:
            assert float(tau) >= 1.0
    assert len(json.loads((tmp_path / "runs.json").read_text())) == 6


def test_fit_gap_evaluates_held_out_and_training_records(script_cache):
    out = run_script("fit_gap.py", script_cache, "--model", "smollm2").splitlines()
    assert [line.split(" (")[0] for line in out] == ["held-out", "training"]
    assert out[0].startswith("held-out (2 records)") and out[1].startswith("training (1 records)")
    for line in out:
        taus = [float(t) for t in re.findall(r"tau " + NUMBER, line)]
        assert taus and all(1.0 <= t <= 5.0 for t in taus), line


def test_media_tau_gives_teacher_forced_and_real_tau_per_media(script_cache):
    out = run_script("media_tau.py", script_cache, "--model", "smollm2", "--max-new-tokens", "24",
                     "assets/examples/cat.jpg", "assets/examples/cat_pan.mp4").splitlines()
    pattern = (r"^(cat\.jpg|cat_pan\.mp4): (\d+) tokens, teacher-forced tau " + NUMBER
               + r" \(slot hits (?:[0-9.]+ / ){3}[0-9.]+\), real flash tau " + NUMBER + "$")
    rows = [re.match(pattern, line) for line in out[:2]]
    assert all(rows), out
    for row in rows:
        forced, real = float(row.group(3)), float(row.group(4))
        assert 1.0 <= forced <= 5.0 and 1.0 <= real <= 5.0, row.group(0)
    assert re.match(r"^mean teacher-forced tau " + NUMBER + " over 2 media$", out[2])


def test_video_grid_pools_each_frame_to_the_grid_asked(script_cache):
    out = run_script("video_grid.py", script_cache, "--model", "smollm2", "--grids", "7", "2",
                     "--max-new-tokens", "8", "assets/examples/cat_pan.mp4").splitlines()
    pattern = r"^cat_pan\.mp4 grid (\d): (\d+) prompt tokens, prefill " + NUMBER + r" s, (\d+) tokens$"
    rows = [re.match(pattern, line) for line in out[0::2]]
    assert len(rows) == 2 and all(rows), out
    (g7, len7, _, n7), (g2, len2, _, n2) = (row.groups() for row in rows)
    assert (g7, g2) == ("7", "2") and 1 <= int(n7) <= 8 and 1 <= int(n2) <= 8
    assert int(len7) - int(len2) == 8 * (49 - 4)  # eight frames, 49 positions each against 4
    assert all(line.startswith("    '") for line in out[1::2]), out


def test_caption_variants_prints_one_row_per_caption_and_a_summary_per_variant(script_cache):
    out = run_script("caption_variants.py", script_cache, "--model", "smollm2", "--limit", "2", "--max-new-tokens",
                     "6", "base", "ngram:2", "plain", "--media", "assets/examples/cat_pan.mp4").splitlines()
    row = r"^(base|ngram:2|plain) (named |MISSED|      ) +(\S+): repeats " + NUMBER + r", (\d+) tokens, tau " + NUMBER
    rows = [re.match(row, line) for line in out if not line.startswith("==")]
    assert len(rows) == 9 and all(rows), out  # 2 example photos + 1 clip, per variant
    assert [r.group(3) for r in rows[:3]] == ["cat.jpg", "coffee.jpg", "cat_pan.mp4"]
    assert rows[2].group(2) == "      "  # a --media file has no subject label
    assert all(1 <= int(r.group(5)) <= 6 and float(r.group(6)) >= 1 for r in rows)
    summaries = [line for line in out if line.startswith("==")]
    assert [s.split(":")[0] for s in summaries] == ["== base", "== ngram", "== plain"]
    assert all(re.search(r"subject named [0-2]/2, mean repeats " + NUMBER, s) for s in summaries), summaries
