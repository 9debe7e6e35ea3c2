"""Figures the README derives from a benchmark's per-sample records: ``python scripts/bench_ratios.py [JSON ...]``.

For each ``python -m flash bench --json`` file (default: ``docs/bench.json``): per method, the median
over runs of the decoding-only speed-up (``ar``'s ms per token after its prefill / the method's, each
run against ``ar`` on the same sample and repeat); the draft tokens proposed and accepted per target
pass (mean over runs; proposed = accepted / acceptance rate); ``flash-tree`` over ``flash`` per run
(median, how many runs faster, images, videos); and ``ar``'s median decoding ms per token, prefill
seconds and whole seconds, for images and videos.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ms_per_token(record: dict) -> float:
    """Decoding time after the prefill per new token (the prefill's token included, as in the ratios)."""
    return (record["seconds"] - record["prefill_seconds"]) * 1000 / record["new_tokens"]


def report(path: Path, data: dict) -> None:
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
