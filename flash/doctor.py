"""``python -m flash doctor``: does FLASH run exactly on this machine, and where does it run?

Loads a target (the embedded default, a hub id or local checkpoint, or a tiny random LLaVA /
Qwen2.5-VL loaded the way a hub checkpoint is: bf16 and ``device_map="auto"`` on CUDA, with an
:func:`echo_draft`) and its draft (the shipped or given one, else an untrained one), runs every
decoding method greedily on a shipped example and prints a few lines a Space builder can read: the
target, its dtype and attention; where its inputs, outputs, layers and draft sit; each method's
tokens/s and τ and whether its output equals ``ar``'s token for token; peak memory (RSS on CPU,
``torch.cuda.max_memory_allocated`` per GPU).

A method that differs from ``ar`` is reported with the position and the target's top-2 gap there
(by plain one-token decoding, as ``bench`` and the tests report it), labelled a *near-tie* when the
gap is within the dtype's rounding of the logits (:func:`near_tie_tolerance`: in bf16 a verification
pass over k+1 tokens can round differently from a one-token step and flip such a tie) and a bug
otherwise. Either way the exit status is 1: a difference is never hidden.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, replace

import torch

from flash.draft import DraftConfig, FlashDraft
from flash.engine import DEFAULT_MIN_DRAFT_PROB, METHODS, GenerationConfig, TreeConfig, collect, generate
from flash.engine.near_ties import first_difference, near_tie_tolerance, top2_after
from flash.targets.base import TargetModel

TINY = ("llava", "qwen2.5-vl")


@dataclass(frozen=True)
class MethodCheck:
    """One method's run against ``ar``: ``first_difference`` None means token for token the same."""

    method: str
    tokens: int
    tokens_per_s: float
    tau: float
    first_difference: int | None = None
    top2_gap: float | None = None  # the target's top-2 logit gap at the first difference
    tolerance: float | None = None  # the dtype's rounding there: a gap within it is a near-tie
    skipped: str | None = None  # why the method did not run (e.g. no tree mask on this attention)

    @property
    def identical(self) -> bool:
        return self.skipped is not None or self.first_difference is None

    @property
    def near_tie(self) -> bool:
        return self.top2_gap is not None and self.tolerance is not None and self.top2_gap <= self.tolerance


@dataclass(frozen=True)
class DoctorReport:
    """What :func:`run_doctor` found (printed by :func:`format_report`)."""

    target: str
    kind: str  # the adapter's class
    dtype: str
    attention: str | None  # the HF attention implementation (None: the default target's own)
    tree: bool  # whether the target verifies draft trees
    input_device: str
    output_device: str
    draft_device: str
    layers: str  # where the model's modules sit (accelerate's device map), counted per device
    example: str
    settings: str  # the draft settings the methods ran with
    checks: tuple[MethodCheck, ...]
    memory: str

    @property
    def ok(self) -> bool:
        return all(check.identical for check in self.checks)


def doctor_config(target: TargetModel, max_new_tokens: int, tiny: bool) -> GenerationConfig:
    """Greedy, with the target's rules and the app's draft settings; for a tiny random target without the
    draft's confidence cuts (its near-uniform draft never reaches them, so no tree would be drafted)."""
    if tiny:
        return GenerationConfig(max_new_tokens=max_new_tokens, rules=target.logits_rules(),
                                tree=TreeConfig(min_prob=0.0))
    return GenerationConfig(max_new_tokens=max_new_tokens, rules=target.logits_rules(),
                            min_draft_prob=DEFAULT_MIN_DRAFT_PROB)


def run_doctor(target: TargetModel, draft: FlashDraft, media, config: GenerationConfig,
               prompt_text: str | None = None, example: str = "") -> DoctorReport:
    """Run every method on ``media`` with the greedy ``config`` and compare each with ``ar`` (module docstring)."""
    if not config.greedy:
        raise ValueError("the doctor compares greedy outputs: use temperature 0")
    prompt = target.build_prompt(media, prompt_text or target.default_prompt(media))
    methods = ["ar"] + [m for m in METHODS if m != "ar"]
    runnable = [m for m in methods if m != "flash-tree" or target.supports_tree]
    for method in runnable:  # warm-up (allocator, kernels), excluded from the numbers
        collect(generate(target, prompt, method, draft, replace(config, max_new_tokens=4)))
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
    results = {m: collect(generate(target, prompt, m, draft, config)) for m in runnable}
    reference = results["ar"].tokens
    checks = []
    for method in methods:
        if method not in results:
            attention = getattr(target, "attn_implementation", "its")
            checks.append(MethodCheck(method, 0, 0.0, 0.0, skipped=f"{attention} attention takes no tree mask"))
            continue
        result = results[method]
        diff = first_difference(result.tokens, reference)
        gap = tolerance = None
        if diff is not None:
            top1, top2 = top2_after(target, prompt, reference[:diff], config)
            gap, tolerance = top1 - top2, near_tie_tolerance(top1, target.dtype)
        checks.append(MethodCheck(method, result.new_tokens, result.tokens_per_s, result.tau, diff, gap, tolerance))
    output_device = getattr(target, "output_device", target.device)
    return DoctorReport(
        target=target.name, kind=type(target).__name__, dtype=_dtype(target),
        attention=getattr(target, "attn_implementation", None), tree=target.supports_tree,
        input_device=str(target.device), output_device=str(output_device),
        draft_device=str(draft.slot_embed.device), layers=_layers(target), example=example,
        settings=(f"greedy, {config.max_new_tokens} new tokens, k {config.k or draft.cfg.k}, min_draft_prob "
                  f"{config.min_draft_prob:g}, tree {config.tree.nodes} nodes / branch {config.tree.branch} / "
                  f"min {config.tree.min_prob:g}"),
        checks=tuple(checks), memory=_memory(),
    )


def _dtype(target: TargetModel) -> str:
    name = str(target.dtype).removeprefix("torch.")
    weights = getattr(target, "weight_format", None)
    return f"{name} activations, {weights} weights" if weights and weights != name else name


def _layers(target: TargetModel) -> str:
    """accelerate's placement, as module counts per device ("" when the model is not dispatched)."""
    device_map = getattr(getattr(target, "model", None), "hf_device_map", None)
    if not device_map:
        return ""
    counts = Counter(f"cuda:{d}" if isinstance(d, int) else str(d) for d in device_map.values())
    return ", ".join(f"{device} {count}" for device, count in counts.items())


def _memory() -> str:
    """Peak memory of this process: RSS, and what torch allocated on each GPU."""
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    parts = [f"peak RSS {rss_gib:.2f} GiB"]
    if torch.cuda.is_available():
        parts += [f"cuda:{i} peak allocated {torch.cuda.max_memory_allocated(i) / 2**30:.2f} GiB"
                  for i in range(torch.cuda.device_count())]
    return ", ".join(parts)


def format_report(report: DoctorReport) -> list[str]:
    """The report as a few readable lines (the last one says OK or FAIL)."""
    attention = f", {report.attention} attention" if report.attention else ""
    lines = [
        f"target   {report.target} ({report.kind}), {report.dtype}{attention}; "
        f"draft trees: {'verified' if report.tree else 'not verified (flash chains instead)'}",
        f"devices  inputs {report.input_device}, outputs {report.output_device}, draft {report.draft_device}"
        + (f"; modules per device: {report.layers}" if report.layers else ""),
        f"example  {report.example}: {report.settings}",
    ]
    for check in report.checks:
        if check.skipped:
            lines.append(f"  {check.method:<10} skipped: {check.skipped}")
            continue
        verdict = "same tokens as ar" if check.method != "ar" else "(the reference)"
        if check.first_difference is not None:
            kind = "a near-tie flip (rounding)" if check.near_tie else "NOT a near-tie (a bug)"
            verdict = (f"DIFFERS from ar at token {check.first_difference}: top-2 gap {check.top2_gap:.3g}, "
                       f"{kind}; rounding there ~{check.tolerance:.3g}")
        lines.append(f"  {check.method:<10} {check.tokens:>4} tokens {check.tokens_per_s:>8.1f} tokens/s "
                     f"tau {check.tau:4.2f}  {verdict}")
    lines.append(f"memory   {report.memory}")
    failed = [c.method for c in report.checks if not c.identical]
    lines.append("result   OK: every method gives ar's tokens" if report.ok else
                 f"result   FAIL: {', '.join(failed)} differ from ar (see above)")
    return lines


def load(model: str, tiny: str | None, attention: str | None, draft_path: str | None,
         stack: ExitStack) -> tuple[TargetModel, FlashDraft]:
    """The target and draft the doctor checks. A tiny target is saved and loaded back through
    :func:`flash.targets.hub.load_hf_target`, the path a hub id takes (bf16 and device_map on CUDA)."""
    from flash.models import is_embedded, load_draft, load_target

    if tiny is not None or (attention and not is_embedded(model)):
        from flash.targets.hub import load_hf_target
        from flash.targets.tiny import tiny_llava, tiny_qwen2_5_vl

        source, name = model, None
        if tiny is not None:
            made = (tiny_llava if tiny == "llava" else tiny_qwen2_5_vl)(0)
            source, name = stack.enter_context(tempfile.TemporaryDirectory(prefix="flash-doctor-")), made.name
            made.save_pretrained(source)
        target = load_hf_target(source, attn_implementation=attention)
        target.name = name or target.name  # the tiny model's own name, not its temporary folder's
    else:
        target = load_target(model, quiet=True)
    if tiny is not None and draft_path is None:
        return target, echo_draft(target)
    return target, load_draft(target, draft_path, quiet=tiny is not None)


def echo_draft(target: TargetModel) -> FlashDraft:
    """A draft for a random target, which no trained draft fits: every slot predicts ``h_t`` itself (the
    block's output and the stream zeroed, gate 1), so it proposes what the target liked one position
    earlier, often enough right that accepting, rejecting and rolling back all run."""
    from flash.models import draft_heads_for

    cfg = DraftConfig(target_name=target.name, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                      num_heads=draft_heads_for(target.hidden_size), intermediate_size=2 * target.hidden_size, k=3,
                      num_latents=4)
    with torch.random.fork_rng(devices=[]):  # reproducible weights without touching the caller's RNG
        torch.manual_seed(0)
        draft = FlashDraft(cfg)
    with torch.no_grad():
        draft.slot_gate.fill_(1.0)
        for weight in (draft.fuse.weight, draft.slot_embed, *(w for b in draft.blocks for w in (b.o_proj.weight,
                                                                                               b.down.weight))):
            weight.zero_()
    return draft.to(device=target.device, dtype=target.dtype).bind(target).eval()


def _shown(path: str) -> str:
    """``path`` relative to the working directory where it lies below it (the shipped example's)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def main(args, media) -> int:
    """``python -m flash doctor`` (arguments checked, ``media`` loaded by :mod:`flash.cli`): print the report;
    1 if any method differs."""
    with ExitStack() as stack:
        target, draft = load(args.model, args.tiny, args.attention, args.draft, stack)
        config = doctor_config(target, args.max_new_tokens, tiny=args.tiny is not None)
        report = run_doctor(target, draft, media, config, args.prompt, example=_shown(args.media))
    for line in format_report(report):
        print(line)
    if not report.ok:
        print("error: greedy output differs from ar (see above)", file=sys.stderr)
    return 0 if report.ok else 1
