"""Sampling speed of ar / flash / flash-tree, pooled over many seeds (decoding only, after the prefill).

With sampling every method draws its own caption, so one run's tokens/s mixes speed with the
caption's length (a 10-token caption is mostly prefill). This runs each medium with several seeds,
the three methods interleaved (the order rotates), and pools milliseconds per decoded token, tau and
the drafts proposed / accepted per pass over all runs of a method.

    python research/sampling_speed.py [MEDIA ...] [--seeds 6] [--max-new-tokens 128] [--tree-nodes N]
        [--tree-branch B] [--min-draft-prob P] [--model M] [--json OUT]

Defaults: the benchmark's held-out media (gradio's photos and videos), temperature 0.7, top-p 0.9, the
CLI's confidence cut and tree settings, the shipped draft.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from default_run import add_model_arg  # noqa: E402 (a sibling script)

from flash.bench import load_samples  # noqa: E402
from flash.engine import DEFAULT_MIN_DRAFT_PROB, GenerationConfig, TreeConfig, collect, generate  # noqa: E402
from flash.models import load_draft, load_target  # noqa: E402

METHODS = ("ar", "flash", "flash-tree")
HELD_OUT = ("images/cheetah.jpg", "images/lion.jpg", "images/bus.png", "images/tower.jpg",
            "videos/a.mp4", "videos/b.mp4", "videos/world.mp4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("media", nargs="*", help="media files (default: the benchmark's held-out media)")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--tree-nodes", type=int, default=TreeConfig.nodes,
                        help="flash-tree's drawn nodes (default: the CLI's)")
    parser.add_argument("--tree-branch", type=int, default=TreeConfig.branch,
                        help="flash-tree's siblings drawn under the root (default: the CLI's)")
    parser.add_argument("--min-draft-prob", type=float, default=DEFAULT_MIN_DRAFT_PROB,
                        help="the confidence cut of flash and of flash-tree's drawn chain (default: the CLI's)")
    parser.add_argument("--json", default=None, help="write the per-run records here")
    add_model_arg(parser)
    args = parser.parse_args()
    if not args.media:
        import gradio

        root = Path(gradio.__file__).parent / "media_assets"
        args.media = [str(root / name) for name in HELD_OUT]

    target = load_target(args.model)
    draft = load_draft(target, None)
    samples = load_samples(args.media, [], target)
    prompts = {s.name: target.build_prompt(s.media, s.prompt) for s in samples}

    def config(seed: int, tokens: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=tokens, temperature=args.temperature, top_p=args.top_p, seed=seed,
                                rules=target.logits_rules(), min_draft_prob=args.min_draft_prob,
                                tree=TreeConfig(nodes=args.tree_nodes, branch=args.tree_branch))

    def run(method: str, sample, cfg: GenerationConfig):
        return collect(generate(target, prompts[sample.name], method, None if method == "ar" else draft, cfg))

    for method in METHODS:  # warm-up
        run(method, samples[0], config(0, 8))
    rows = []
    for seed in range(args.seeds):
        for i, sample in enumerate(samples):
            shift = (seed + i) % len(METHODS)
            for method in METHODS[shift:] + METHODS[:shift]:
                r = run(method, sample, config(seed, args.max_new_tokens))
                rows.append({"sample": sample.name, "kind": sample.media.kind, "seed": seed, "method": method,
                             "tokens": r.new_tokens, "steps": r.steps, "accepted": r.accepted,
                             "proposed": r.proposed, "decode_s": r.seconds - r.prefill_seconds})
            print(f"seed {seed}, {sample.name}: done", file=sys.stderr, flush=True)

    for kind in ("image", "video", "all"):
        ms = {}
        for method in METHODS:
            sel = [r for r in rows if r["method"] == method and kind in ("all", r["kind"])]
            if not sel:
                continue
            steps = max(1, sum(r["steps"] for r in sel))
            decoded = max(1, sum(r["tokens"] - 1 for r in sel))
            ms[method] = 1000 * sum(r["decode_s"] for r in sel) / decoded
            print(f"{kind} {method}: {ms[method]:.2f} ms per decoded token, x{ms['ar'] / ms[method]:.3f} vs ar, "
                  f"tau {decoded / steps:.3f}, proposed / accepted per pass "
                  f"{sum(r['proposed'] for r in sel) / steps:.2f} / {sum(r['accepted'] for r in sel) / steps:.2f}, "
                  f"{len(sel)} runs")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
