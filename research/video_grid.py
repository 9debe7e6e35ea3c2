"""What pooling a video frame's visual tokens does to the embedded model: prompt length, prefill (first
token) time and the greedy caption, for each grid (7 = MobileNetV2's full 7x7, 49 tokens per frame).

    python research/video_grid.py [--model default] [--grids 7 3 1] [--max-new-tokens 128] CLIP...

Prints, per clip and grid: ``<clip> grid G: L prompt tokens, prefill P s, N tokens`` and the caption's
first 300 characters; the grids of one clip run in turn, so compare times within a run on a quiet
machine. The model's own grid is ``EmbeddedLM.video_grid`` (docs/qwen_model.md).
"""

import argparse
import dataclasses
import time

from default_run import add_model_arg

from flash.engine import GenerationConfig, collect, generate
from flash.media import MediaError, load_media
from flash.models import load_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arg(parser)
    parser.add_argument("--grids", type=int, nargs="+", default=[7, 3, 1], choices=range(1, 8), metavar="G")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("clips", nargs="+")
    args = parser.parse_args()
    target = load_target(args.model, quiet=True)
    spec = target.spec
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, rules=target.logits_rules())
    for path in args.clips:
        try:
            media = load_media(path)
        except MediaError as exc:
            raise SystemExit(f"error: {exc}") from None
        for grid in args.grids:
            target.spec = dataclasses.replace(spec, video_grid=grid)
            prompt = target.build_prompt(media, target.default_prompt(media))
            start = time.perf_counter()
            target.prefill(prompt)
            prefill = time.perf_counter() - start
            tokens = collect(generate(target, prompt, "ar", None, config)).tokens
            print(f"{media.source} grid {grid}: {prompt.length} prompt tokens, prefill {prefill:.2f} s, "
                  f"{len(tokens)} tokens", flush=True)
            print(f"    {target.decode(list(tokens))[:300]!r}", flush=True)
    target.spec = spec


if __name__ == "__main__":
    main()
