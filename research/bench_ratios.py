"""Figures docs/results.md takes from a benchmark's records: ``python research/bench_ratios.py [JSON ...]``.

For each ``python -m flash bench --json`` file (default: ``docs/bench.json``): per method, the median
over runs of the decoding-only speed-up (``ar``'s ms per token after its prefill / the method's, each
run against ``ar`` on the same sample and repeat); the draft tokens proposed and accepted per target
pass (mean over runs; proposed = accepted / acceptance rate); ``flash-tree`` over ``flash`` per run
(median, how many runs faster, images, videos); ``ar``'s median decoding ms per token, prefill
seconds and whole seconds, for images and videos; and what the prefill leaves of issue #6's goals (2.5x
on images, 2.7x on videos): the prefill is the same work for every method, so with ``ar``'s prefill a
share p of its run, no method can be more than 1 / p faster end to end, and a goal g needs decoding
(1 - p) / (1 / g - p) times faster than ``ar``'s (medians over runs). Last, the most a draft that is
*always right* could give at the benchmark's draft depth k: every target pass then emits k + 1 tokens,
and a pass costs at least a one-token step (its k + 1 rows read the same weights), so end to end at
most 1 / (p + (1 - p) / (k + 1)) -- drafting taken as free, so a bound no draft of that depth can pass.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"image": 2.5, "video": 2.7}  # issue #6: end-to-end speed-up over ar


def decoding_speedup_needed(prefill_share: float, goal: float) -> float:
    """How many times faster than ``ar``'s its decoding must be for ``goal`` end to end, when the prefill
    (the same for every method) is ``prefill_share`` of ``ar``'s run; inf where even free decoding misses it."""
    room = 1 / goal - prefill_share
    return (1 - prefill_share) / room if room > 0 else float("inf")


def perfect_draft_speedup(prefill_share: float, tokens_per_pass: float, pass_cost: float = 1.0) -> float:
    """End-to-end speed-up over ``ar`` of a draft that is always right: after the same prefill (``prefill_share``
    of ``ar``'s run), every target pass emits ``tokens_per_pass`` tokens and costs ``pass_cost`` one-token
    steps, and drafting costs nothing (an upper bound for any real draft of that depth)."""
    return 1 / (prefill_share + (1 - prefill_share) * pass_cost / tokens_per_pass)


def ms_per_token(record: dict) -> float:
    """Decoding time after the prefill per new token (the prefill's token included, as in the ratios)."""
    return (record["seconds"] - record["prefill_seconds"]) * 1000 / record["new_tokens"]


def report(path: Path, data: dict) -> None:
    config = data.get("config") or {}
    # The draft's depth: its own k, or a run's smaller --k (the FLASH loops draft min(--k, the draft's k)).
    depths = [k for k in (config.get("k"), (config.get("draft") or {}).get("k")) if k]
    depth = min(depths) if depths else None
    runs: dict[tuple[str, int], dict[str, dict]] = {}
    for record in data["samples"]:
        runs.setdefault((record["sample"], record["repeat"]), {})[record["method"]] = record
    runs_list = list(runs.values())
    print(f"{path}: {len(runs_list)} runs")
    methods = [m for m in data["methods"] if m != "ar"]
    cells = [f"{m} {statistics.median(ms_per_token(r['ar']) / ms_per_token(r[m]) for r in runs_list):.2f}x"
             for m in methods]
    print("  decoding-only speed-up (median): " + ", ".join(cells))
    per_pass = []
    for m in methods:
        accepted = [r[m]["tau"] - 1 for r in runs_list]
        proposed = [a / r[m]["acceptance_rate"] if r[m]["acceptance_rate"] else 0.0
                    for a, r in zip(accepted, runs_list, strict=True)]
        per_pass.append(f"{m} {statistics.mean(proposed):.2f} / {statistics.mean(accepted):.2f}")
    print("  draft tokens per pass, proposed / accepted (mean): " + ", ".join(per_pass))
    if {"flash", "flash-tree"} <= set(methods):
        def tree_over_chain(kind: str | None) -> list[float]:
            return [r["flash-tree"]["tokens_per_s"] / r["flash"]["tokens_per_s"] for r in runs_list
                    if kind is None or r["ar"]["kind"] == kind]
        every = tree_over_chain(None)
        images, videos = (statistics.median(tree_over_chain(kind)) for kind in ("image", "video"))
        print(f"  flash-tree over flash per run: median {statistics.median(every):.2f}x, faster in "
              f"{sum(x > 1 for x in every)} of {len(every)} (images {images:.2f}x, videos {videos:.2f}x)")
    for kind in ("image", "video"):
        ar = [r["ar"] for r in runs_list if r["ar"]["kind"] == kind]
        if ar:
            decode = statistics.median((a["seconds"] - a["prefill_seconds"]) * 1000 / (a["new_tokens"] - 1) for a in ar)
            print(f"  ar, {kind}s: {decode:.1f} ms per decoded token, prefill "
                  f"{statistics.median(a['prefill_seconds'] for a in ar):.2f} s, "
                  f"whole {statistics.median(a['seconds'] for a in ar):.2f} s (medians)")
            shares = [a["prefill_seconds"] / a["seconds"] for a in ar]
            needed = statistics.median(decoding_speedup_needed(p, GOALS[kind]) for p in shares)
            print(f"  ar, {kind}s: prefill {statistics.median(shares):.0%} of the run, so at most "
                  f"{statistics.median(1 / p for p in shares):.1f}x end to end; {GOALS[kind]}x needs decoding "
                  f"{needed:.1f}x faster (medians)")
            if depth:
                ceiling = statistics.median(perfect_draft_speedup(p, depth + 1) for p in shares)
                print(f"  ar, {kind}s: a draft always right at depth {depth} ({depth + 1} tokens per pass, a pass "
                      f"costing one step, drafting free): at most {ceiling:.2f}x end to end (median)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("json", nargs="*", default=[str(ROOT / "docs" / "bench.json")])
    for name in parser.parse_args().json:
        try:
            data = json.loads(Path(name).read_text())
            data["samples"], data["methods"]  # noqa: B018 (what a --json file has)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            sys.exit(f"error: {name}: not a benchmark --json file ({exc})")
        report(Path(name), data)
