"""Benchmark harness: every method on the same samples, interleaved in one process.

Speed-up is always a ratio measured side by side: for each sample, a method's tokens/s divided by
``ar``'s tokens/s on the same sample in the same run. Greedy outputs must equal ``ar``'s token for
token; a mismatch is reported (with the target's top-2 logit gap at the first difference) and
fails the run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from flash.engine import GenerationConfig, GenerationResult, collect, generate
from flash.engine.config import DRAFT_METHODS
from flash.engine.near_ties import first_difference, top2_gap
from flash.media import Media, load_media_files
from flash.targets.base import TargetModel


@dataclass(frozen=True)
class Sample:
    """One benchmark input."""

    name: str
    media: Media
    prompt: str


@dataclass(frozen=True)
class Run:
    """One method on one sample (one repeat)."""

    sample: str
    kind: str
    method: str
    repeat: int
    result: GenerationResult
    speedup: float  # tokens/s ÷ ar's tokens/s for the same sample and repeat
    identical: bool | None


def machine_info(target: TargetModel) -> dict:
    """What the numbers were measured on."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    # The vector ISA matters here: the same VM has measured ~3x apart between days, and FLASH's CPU
    # kernels take an AVX-512 path where it exists (torch's name for it: AVX2, AVX512, ...).
    return {"cpu": cpu, "cpu_isa": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "target": target.name, "device": str(target.device),
            "weights": getattr(target, "weight_format", str(target.dtype).removeprefix("torch."))}


def run_benchmark(target: TargetModel, draft, samples: list[Sample], methods: list[str], config: GenerationConfig,
                  repeats: int = 1, warmup: int = 1, log=lambda m: print(m, file=sys.stderr, flush=True),
                  compare_drafts: dict[str, object] | None = None) -> dict:
    """Run ``methods`` on every sample (``ar`` always included, first), interleaved; return a report dict.

    ``compare_drafts`` (name -> draft): every draft method also runs with each of these, labelled
    ``METHOD@NAME`` and interleaved with the rest, so two drafts are compared side by side in one run
    (the report's ``draft_ab``) rather than across runs whose machine state differs.
    """
    methods = ["ar"] + [m for m in methods if m != "ar"]
    runs_as = {m: (m, draft) for m in methods}  # label -> (method, draft)
    for name, other in (compare_drafts or {}).items():
        runs_as |= {f"{m}@{name}": (m, other) for m in methods if m in DRAFT_METHODS}
    labels = list(runs_as)
    prompts = {s.name: target.build_prompt(s.media, s.prompt) for s in samples}
    for i in range(warmup):  # warm-up: allocator, kernels, caches; excluded from timing
        for label in labels:
            collect(generate(target, prompts[samples[i % len(samples)].name], *runs_as[label],
                             GenerationConfig(max_new_tokens=8, rules=config.rules, k=config.k)))
    runs: list[Run] = []
    mismatches = []
    for s_i, sample in enumerate(samples):
        for rep in range(repeats):
            # Rotate the order so no method always runs first (caches, turbo, thermal drift).
            shift = (s_i + rep) % len(labels)
            order = labels[shift:] + labels[:shift]
            results = {m: collect(generate(target, prompts[sample.name], *runs_as[m], config)) for m in order}
            base = results["ar"]
            for m in labels:
                r = results[m]
                same = None
                if config.greedy:
                    diff = first_difference(r.tokens, base.tokens)
                    same = diff is None
                    if not same:
                        gap = top2_gap(target, prompts[sample.name], base.tokens[:diff], config)
                        mismatches.append({"sample": sample.name, "method": m, "position": diff, "top2_gap": gap})
                runs.append(Run(sample.name, sample.media.kind, m, rep, r,
                                r.tokens_per_s / base.tokens_per_s if base.tokens_per_s else 0.0, same))
            log(f"[{s_i + 1}/{len(samples)}] {sample.name} rep {rep + 1}: " + ", ".join(
                f"{m} {results[m].tokens_per_s:.1f} tok/s" + (f" (x{results[m].tokens_per_s / base.tokens_per_s:.2f},"
                                                               f" tau {results[m].tau:.2f})" if m != "ar" else "")
                for m in labels))
    aggregated = {m: _aggregate([r for r in runs if r.method == m]) for m in labels}
    return {"machine": machine_info(target), "config": {"max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature, "top_p": config.top_p, "k": config.k,
            "min_draft_prob": config.min_draft_prob, "repeats": repeats,
            "warmup": warmup, "draft": _draft_config(draft),
            "compare_drafts": {name: _draft_config(d) for name, d in (compare_drafts or {}).items()}},
            "methods": aggregated,
            "by_kind": {kind: {m: _aggregate([r for r in runs if r.method == m and r.kind == kind]) for m in labels}
                        for kind in sorted({r.kind for r in runs})},
            "draft_ab": [_draft_ab(runs, aggregated, m, label) for label, (m, _) in runs_as.items() if label != m],
            "mismatches": mismatches,
            "samples": [_run_record(r) for r in runs]}


def _draft_config(draft) -> dict | None:
    return getattr(getattr(draft, "cfg", None), "__dict__", None)


def _draft_ab(runs: list[Run], aggregated: dict[str, dict], method: str, label: str) -> dict:
    """``label`` (a method with another draft) against ``method`` with the main draft: per-run tokens/s
    ratios, each paired on the same sample and repeat, and both τ (from ``aggregated``, per label)."""
    mine = {(r.sample, r.repeat): r.result for r in runs if r.method == label}
    ratios = [mine[r.sample, r.repeat].tokens_per_s / r.result.tokens_per_s
              for r in runs if r.method == method and r.result.tokens_per_s]
    return {"method": method, "versus": label, "runs": len(ratios), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_above_1": sum(x > 1 for x in ratios),
            "tau": aggregated[method]["tau"], "tau_versus": aggregated[label]["tau"]}


def _aggregate(runs: list[Run]) -> dict:
    if not runs:
        return {}
    res = [r.result for r in runs]
    speedups = [r.speedup for r in runs]
    total = sum(x.seconds for x in res) or 1.0
    draft_s, verify_s, prefill_s = (sum(x.draft_seconds for x in res), sum(x.verify_seconds for x in res),
                                    sum(x.prefill_seconds for x in res))
    steps = sum(x.steps for x in res)
    return {
        "samples": len(runs),
        "tokens_per_s": statistics.median(x.tokens_per_s for x in res),
        "speedup": statistics.median(speedups),
        "speedup_min": min(speedups),
        "speedup_max": max(speedups),
        "tau": (sum(x.new_tokens - 1 for x in res) / steps) if steps else 1.0,
        "acceptance_rate": (sum(x.accepted for x in res) / p) if (p := sum(x.proposed for x in res)) else 0.0,
        "new_tokens": sum(x.new_tokens for x in res),
        "prefill_s_mean": prefill_s / len(res),
        "time_split": {"prefill": prefill_s / total, "draft": draft_s / total, "verify": verify_s / total,
                       "other": max(0.0, 1 - (prefill_s + draft_s + verify_s) / total)},
        "identical": all(r.identical for r in runs) if runs[0].identical is not None else None,
    }


def _run_record(r: Run) -> dict:
    x = r.result
    return {"sample": r.sample, "kind": r.kind, "method": r.method, "repeat": r.repeat, "new_tokens": x.new_tokens,
            "seconds": x.seconds, "tokens_per_s": x.tokens_per_s, "speedup": r.speedup, "tau": x.tau,
            "acceptance_rate": x.acceptance_rate, "steps": x.steps, "prefill_seconds": x.prefill_seconds,
            "draft_seconds": x.draft_seconds, "verify_seconds": x.verify_seconds, "identical": r.identical}


def markdown_table(report: dict) -> str:
    """The report as a markdown table (overall and per media kind)."""
    lines = ["| media | method | tokens/s | speed-up vs ar (median, min–max) | τ | acceptance "
             "| draft / verify / prefill / other |", "|---|---|---|---|---|---|---|"]
    for kind, table in [("all", report["methods"])] + list(report["by_kind"].items()):
        for m, a in table.items():
            if not a:
                continue
            split = a["time_split"]
            lines.append(
                f"| {kind} | {m} | {a['tokens_per_s']:.1f} | {a['speedup']:.2f}× ({a['speedup_min']:.2f}–"
                f"{a['speedup_max']:.2f}) | {a['tau']:.2f} | {a['acceptance_rate']:.2f} | "
                f"{split['draft']:.0%} / {split['verify']:.0%} / {split['prefill']:.0%} / {split['other']:.0%} |")
    mi = report["machine"]
    lines.append("")
    lines.append(f"Machine: {mi['cpu']} ({mi['cpu_count']} cores, {mi.get('cpu_isa', '?')}, "
                 f"{mi['torch_threads']} torch threads), "
                 f"GPU: {mi['gpu'] or 'none'}, torch {mi['torch']}, transformers {mi['transformers']}.")
    for ab in report.get("draft_ab", []):
        lines.append(f"{ab['versus']} vs {ab['method']}: ×{ab['ratio']:.3f} tokens/s (median of {ab['runs']} paired "
                     f"runs: {ab['ratio_min']:.2f}–{ab['ratio_max']:.2f}, faster in {ab['ratio_above_1']} of them), "
                     f"τ {ab['tau_versus']:.2f} vs {ab['tau']:.2f}")
    if report["mismatches"]:
        lines.append(f"MISMATCHES vs ar: {json.dumps(report['mismatches'])}")
    return "\n".join(lines)


STATIC_PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp")  # written by plotly through kaleido


def plot_path_problem(path: Path) -> str | None:
    """Why :func:`write_plot` could not write ``path`` (None if it can): checked before a run, not after."""
    suffix = path.suffix.lower()
    if suffix == ".html":
        return None
    if suffix not in STATIC_PLOT_SUFFIXES:
        return f"--plot {path}: give a .html path (or .png/.svg/.pdf with kaleido)"
    try:
        import kaleido  # noqa: F401  (plotly's static image writer)
    except ImportError:
        return f"--plot {path}: static images need kaleido (pip install kaleido); a .html path needs nothing more"
    return None


def write_plot(report: dict, path: Path) -> None:
    """Per-sample speed-up of each method (plotly HTML, or PNG/SVG if kaleido is installed)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for m in report["methods"]:
        if m == "ar":
            continue
        rows = [r for r in report["samples"] if r["method"] == m]
        fig.add_trace(go.Bar(name=m, x=[f"{r['sample']} #{r['repeat']}" for r in rows], y=[r["speedup"] for r in rows]))
    fig.add_hline(y=1.0, line_dash="dash", annotation_text="ar")
    fig.update_layout(title="Speed-up over plain autoregressive decoding (same run)", yaxis_title="× ar tokens/s",
                      barmode="group")
    if path.suffix.lower() == ".html":
        fig.write_html(str(path), include_plotlyjs="cdn")
    else:
        fig.write_image(str(path))


def samples_for(loaded: list[tuple[Path, Media]], prompts: list[str], target: TargetModel) -> list[Sample]:
    """Loaded media × prompts (each media's default prompt for ``target`` when none are given)."""
    samples = []
    for f, media in loaded:
        for prompt in prompts or [target.default_prompt(media)]:
            name = f.name if not prompts or len(prompts) == 1 else f"{f.name}:{prompt[:20]}"
            samples.append(Sample(name, media, prompt))
    return samples


def load_samples(paths: list[str], prompts: list[str], target: TargetModel) -> list[Sample]:
    """Media × prompts (each media's default prompt when none are given)."""
    return samples_for(load_media_files(paths), prompts, target)
