"""Variants of an embedded model's captioning, each on the same media: subject named, repetition, length, τ.

Why: on the default model some captions circle ("The Egyptian Mau is a cat that is described as a cat.
It is a cat that is ..."). This measures candidate cures side by side, greedy, 128 tokens, the shipped
draft decoding (``flash-tree``, whose output equals ``ar``'s), so each row also gives the real τ:

- ``base``: the model as shipped;
- ``ngram:N``: its n-gram ban at N tokens instead of the shipped size (the rules change the target's
  text, and the draft's tree applies them too);
- ``colour``: the grounding also names the photo's main colours (a coarse HSV count of a 32x32 copy),
  which the request asks about and the LM cannot see (a model with hedged grounding: the default);
- ``plain``: the request without its list of what to cover ("one paragraph of four sentences").

Media: the shipped example photos and the labelled photos of ``python -m flash caption-eval`` (subject
named = one of its words, as there), plus any images or videos given with ``--media`` (no label).
Repetition: the share of a caption's word 3-grams that repeat an earlier one. Prints one line per
caption and a summary line per variant. Run: ``python research/caption_variants.py [--model M]
[--limit N] [--media FILE...] VARIANT...``, e.g. ``base ngram:5 colour``.
"""

import argparse
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from default_run import ROOT, add_model_arg  # noqa: E402 (a sibling script)

import flash.targets.embedded as embedded  # noqa: E402
from flash.caption_eval import caption_names_subject, labelled_photos  # noqa: E402
from flash.engine import GenerationConfig, collect, generate  # noqa: E402
from flash.engine.logits_rules import LogitsRules  # noqa: E402
from flash.media import MediaError, load_media  # noqa: E402
from flash.models import load_draft, load_target  # noqa: E402

EXAMPLES = (("cat.jpg", "cat"), ("coffee.jpg", "espresso"), ("rocket.jpg", "rocket"))


def colour_names(image: Image.Image, most: int = 3, share: float = 0.15) -> list[str]:
    """Up to ``most`` basic colour names covering at least ``share`` of the picture each, commonest first."""
    hsv = np.asarray(image.convert("RGB").resize((32, 32)).convert("HSV")).reshape(-1, 3) / 255.0
    names = []
    for hue, sat, val in zip(hsv[:, 0] * 360, hsv[:, 1], hsv[:, 2], strict=True):
        if val < 0.18:
            name = "black"
        elif sat < 0.18:
            name = "white" if val > 0.82 else "grey"
        elif hue < 15 or hue >= 345:
            name = "brown" if val < 0.55 else "red"
        elif hue < 45:
            name = "brown" if val < 0.65 or sat < 0.45 else "orange"
        else:
            name = next(n for top, n in ((70, "yellow"), (165, "green"), (255, "blue"), (290, "purple"), (345, "pink"))
                        if hue < top)
        names.append(name)
    return [n for n, count in Counter(names).most_common(most) if count / len(names) >= share]


def repeated_trigrams(text: str) -> float:
    """The share of the text's word 3-grams that repeat an earlier one (0 = none)."""
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i : i + 3]) for i in range(len(words) - 2))
    total = sum(grams.values())
    return sum(c - 1 for c in grams.values()) / total if total else 0.0


def media_items(limit: int, extra: list[str]) -> list[dict]:
    items = [{"file": ROOT / "assets" / "examples" / name, "words": [word], "subject": name}
             for name, word in EXAMPLES]
    if limit > len(items):  # (the labelled photos of three wheels are downloaded on first use)
        items += labelled_photos(quiet=True)
    items = items[:limit]
    return items + [{"file": Path(path), "words": None, "subject": Path(path).name} for path in extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="base, ngram:N, colour, plain")
    add_model_arg(parser)
    parser.add_argument("--limit", type=int, default=1000, help="the first N photos (examples, then labelled)")
    parser.add_argument("--media", nargs="*", default=[], help="more images or videos (no subject label)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    for variant in args.variants:
        if variant not in ("base", "colour", "plain") and not re.fullmatch(r"ngram:\d+", variant):
            parser.error(f"unknown variant {variant!r}: give base, ngram:N, colour or plain")
    target = load_target(args.model, quiet=True)
    draft = load_draft(target, None, quiet=True)
    try:
        items = [(item, load_media(item["file"])) for item in media_items(args.limit, args.media)]
    except MediaError as exc:
        sys.exit(f"error: {exc}")
    # Each photo's colours, counted once (not once per variant): only the colour variant reads them.
    photo_colours = [colour_names(Image.open(item["file"])) if "colour" in args.variants and media.kind == "image"
                     else [] for item, media in items]
    shipped_grounding = embedded.hedged_grounding
    colours: list[str] = []  # the current photo's, read by the patched grounding

    def grounding_with_colours(top, scenes=None, people=None):
        text = shipped_grounding(top, scenes, people)
        if not (text and colours):
            return text
        listed = colours[0] if len(colours) == 1 else f"{', '.join(colours[:-1])} and {colours[-1]}"
        return f"{text[:-2]}; its main colours are {listed}.)"

    torch.set_grad_enabled(False)
    for variant in args.variants:
        rules = target.logits_rules()
        if variant.startswith("ngram:"):
            rules = LogitsRules(repetition_penalty=rules.repetition_penalty,
                                no_repeat_ngram_size=int(variant.split(":")[1]))
        embedded.hedged_grounding = grounding_with_colours if variant == "colour" else shipped_grounding
        rows = []
        try:
            for (item, media), names in zip(items, photo_colours, strict=True):
                colours[:] = names
                request = target.default_prompt(media)
                if variant == "plain":
                    request = request.split(":")[0].rstrip(".") + "."
                prompt = target.build_prompt(media, request)
                config = GenerationConfig(max_new_tokens=args.max_new_tokens, rules=rules)
                result = collect(generate(target, prompt, "flash-tree", draft, config))
                caption = target.decode(list(result.tokens))
                named = None if item["words"] is None else caption_names_subject(caption, item["words"])
                rows.append((named, repeated_trigrams(caption), result.new_tokens, result.tau))
                mark = {True: "named ", False: "MISSED", None: "      "}[named]
                print(f"{variant} {mark} {item['subject'][:24]:>24}: repeats {rows[-1][1]:.2f}, "
                      f"{result.new_tokens} tokens, tau {result.tau:.2f}: {caption!r}", flush=True)
        finally:
            embedded.hedged_grounding = shipped_grounding
        labelled = [r for r in rows if r[0] is not None]
        _, repeats, tokens, taus = zip(*rows, strict=True)
        print(f"== {variant}: subject named {sum(r[0] for r in labelled)}/{len(labelled)}, mean repeats "
              f"{statistics.mean(repeats):.3f} (> 0.1 on {sum(r > 0.1 for r in repeats)}), "
              f"mean {statistics.mean(tokens):.0f} tokens, mean tau {statistics.mean(taus):.2f}", flush=True)


if __name__ == "__main__":
    main()
