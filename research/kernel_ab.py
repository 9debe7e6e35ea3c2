"""FLASH's CPU kernels at another git revision vs the working tree's: ``python research/kernel_ab.py REV``.

Builds ``flash/cpu/csrc/*.cpp`` as of REV (e.g. ``HEAD~1``) and as in the working tree into two libraries
whose ops live under other names (so both load into one process), checks that their outputs are the
same floats, and times them interleaved (median of ``--repeats`` rounds): the fp16 GEMM over a decoder
layer's four weight shapes at decoding and prefill row counts (weights warm in cache), and the
decoding attention at the default model's shapes (9 query heads over 3 KV heads, head_dim 64) for an
image's and a video's context. Then the default model's prefill of an image prompt (cat.jpg) and a video
prompt (coffee_rocket_cut.mp4), and decoding passes of 1 and 5 tokens after them, with each library's GEMM
and attention (the rest of the forward the working tree's).
Compiling takes ~40 s per library.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flash.cpu import cpu_kernels  # noqa: E402

LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # q/k/v, o, gate/up, down (SmolLM2-135M)


def build(sources: dict[str, str], tag: str, out_dir: Path) -> tuple:
    """Compile ``sources`` (name -> C++ text) as FLASH's build does, their op namespaces suffixed by
    ``tag``; load the library and return its (gemm, attention) ops."""
    files = []
    for name, text in sources.items():
        text = text.replace("TORCH_LIBRARY(flash_fp16,", f"TORCH_LIBRARY(flash_fp16_{tag},")
        text = text.replace("TORCH_LIBRARY(flash_ops,", f"TORCH_LIBRARY(flash_ops_{tag},")
        path = out_dir / f"{tag}_{name}"
        path.write_text(text)
        files.append(str(path))
    library = out_dir / f"{tag}.so"
    print(f"compiling {tag}...", file=sys.stderr)
    compiler = os.environ.get("CXX") or "c++"
    subprocess.run(cpu_kernels.compile_command(compiler, files, str(library)), check=True, capture_output=True)
    torch.ops.load_library(str(library))
    return getattr(torch.ops, f"flash_fp16_{tag}").linear, getattr(torch.ops, f"flash_ops_{tag}").decode_attention


def timed(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each zero-argument callable, the callables interleaved round by round."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[repeats // 2] for name, t in times.items()}


def _source_at(rev: str, name: str) -> str:
    """A kernel source as of ``rev``: under flash/cpu/csrc, or flash/csrc before the package was split."""
    for folder in ("flash/cpu/csrc", "flash/csrc"):
        done = subprocess.run(["git", "show", f"{rev}:{folder}/{name}"], cwd=ROOT, capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout
    raise SystemExit(f"{name} is in neither flash/cpu/csrc nor flash/csrc at {rev}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the git revision to compare the working tree's kernels with")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    names = [source.name for source in cpu_kernels.SOURCES]
    old = {n: _source_at(args.rev, n) for n in names}
    new = {n: (ROOT / "flash" / "cpu" / "csrc" / n).read_text() for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        ops = {"rev": build(old, "rev", Path(tmp)), "tree": build(new, "tree", Path(tmp))}
    print(f"{args.rev} ('rev') vs the working tree ('tree'), {torch.get_num_threads()} threads, median of "
          f"{args.repeats}")
    torch.manual_seed(0)
    packed = [(cpu_kernels.pack(torch.randn(n, k)), n, k) for n, k in LAYER_SHAPES]
    for rows in (1, 5, 97, 515):
        xs = [torch.randn(rows, k) for _, _, k in packed]

        def layer(gemm, xs=xs):
            return [gemm(x, w, n) for x, (w, n, _) in zip(xs, packed, strict=True)]

        same = all(torch.equal(a, b) for a, b in zip(layer(ops["rev"][0]), layer(ops["tree"][0]), strict=True))
        medians = timed({tag: lambda gemm=gemm: layer(gemm) for tag, (gemm, _) in ops.items()}, args.repeats)
        print(f"a layer's four GEMMs, {rows:>3} rows: rev {medians['rev'] * 1e3:7.3f} ms, tree "
              f"{medians['tree'] * 1e3:7.3f} ms ({medians['tree'] / medians['rev']:.2f}x), same floats: {same}")
    for length in (97, 515):
        for n in (1, 5):
            q, k, v = torch.randn(1, 9, n, 64), torch.randn(1, 3, length, 64), torch.randn(1, 3, length, 64)

            def attend(op, q=q, k=k, v=v):
                return [op(q, k, v, None, 0.125) for _ in range(10)][-1]

            same = torch.equal(attend(ops["rev"][1]), attend(ops["tree"][1]))
            medians = timed({tag: lambda op=op: attend(op) for tag, (_, op) in ops.items()}, args.repeats)
            print(f"decoding attention, {n} queries over {length:>3} keys: rev {medians['rev'] * 1e5:6.1f} us, "
                  f"tree {medians['tree'] * 1e5:6.1f} us ({medians['tree'] / medians['rev']:.2f}x), "
                  f"same floats: {same}")
    model_lines(ops, args.repeats)


def model_lines(ops: dict, repeats: int) -> None:
    """The default model's prefill, and its decoding passes of 1 and 5 tokens after that prompt, with
    each library's GEMM and attention (``cpu_kernels.linear`` / ``decode_attention`` swapped per call;
    the norms and rotary embedding are the working tree's)."""
    from flash.media import load_media
    from flash.targets.embedded import load_embedded_target

    target, own = load_embedded_target(quiet=True, lm="smollm2"), (cpu_kernels.linear, cpu_kernels.decode_attention)

    def use(tag: str) -> None:
        cpu_kernels.linear, cpu_kernels.decode_attention = ops[tag]

    def report(what: str, medians: dict, same: bool, scale: float = 1e3, unit: str = "ms") -> None:
        print(f"{what}: rev {medians['rev'] * scale:.1f} {unit}, tree {medians['tree'] * scale:.1f} {unit} "
              f"({medians['tree'] / medians['rev']:.2f}x), same floats: {same}")

    try:
        for example in ("cat.jpg", "coffee_rocket_cut.mp4"):
            media = load_media(ROOT / "assets" / "examples" / example)
            prompt = target.build_prompt(media, target.default_prompt(media))

            def prefill(tag, prompt=prompt):
                use(tag)
                return target.prefill(prompt)

            outputs = {tag: prefill(tag) for tag in ops}
            same = torch.equal(outputs["rev"].hidden, outputs["tree"].hidden)
            medians = timed({tag: lambda tag=tag: prefill(tag) for tag in ops}, max(repeats // 2, 3))
            report(f"default model's prefill, {example} ({prompt.length} positions)", medians, same)
            state = outputs["tree"].state
            for n in (1, 5):
                ids = torch.randint(200, 5000, (1, n))

                def step(tag, ids=ids, state=state, length=prompt.length):
                    use(tag)
                    logits, _ = target.forward(state, ids)
                    target.crop(state, length)
                    return logits

                same = torch.equal(step("rev"), step("tree"))
                medians = timed({tag: lambda tag=tag: step(tag) for tag in ops}, repeats)
                report(f"default model's {n}-token pass after {example}'s prompt", medians, same)
    finally:
        cpu_kernels.linear, cpu_kernels.decode_attention = own


if __name__ == "__main__":
    main()
