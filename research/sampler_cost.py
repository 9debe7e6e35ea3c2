"""What a sampled token's filtering and draw cost on this CPU: ``python research/sampler_cost.py``.

On real logits rows of the default model (its greedy continuation of cat.jpg's caption, fed in one
pass), times :func:`flash.engine.verification.logits_to_probs` (temperature + top-p) and
:func:`flash.engine.verification.sample` against the direct way (sort each whole row; ``torch.multinomial``)
for one row (a plain decoding step) and five (a verification of four draft tokens): median of 100
calls each, after checking both filters agree. Also prints how often a row's nucleus is wider than
the partial sort's guess (those rows are sorted whole).
"""

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from default_run import add_model_arg  # noqa: E402 (a sibling script)

from flash.engine import GenerationConfig, collect, generate  # noqa: E402
from flash.engine.verification import NUCLEUS_GUESS, _nucleus, logits_to_probs, sample  # noqa: E402
from flash.media import load_media  # noqa: E402
from flash.models import load_target  # noqa: E402

TEMPERATURE, TOP_P, TOKENS = 0.7, 0.9, 64


def sorted_nucleus(logits: torch.Tensor) -> torch.Tensor:
    """Top-p by sorting each whole row (logits_to_probs's path for wide rows, taken for every row)."""
    probs = torch.softmax(logits.float() / TEMPERATURE, dim=-1)
    filtered = _nucleus(*probs.sort(dim=-1, descending=True), TOP_P, probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def median_ms(fn, calls: int = 100) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2] * 1000


def caption_logits(target) -> torch.Tensor:
    """[TOKENS, V] rule-processed logits along the target's greedy caption of cat.jpg."""
    media = load_media(ROOT / "assets" / "examples" / "cat.jpg")
    prompt = target.build_prompt(media, target.default_prompt(media))
    rules = target.logits_rules()
    tokens = list(collect(generate(target, prompt, "ar", None,
                                   GenerationConfig(max_new_tokens=TOKENS, rules=rules))).tokens)
    pre = target.prefill(prompt)
    logits, _ = target.forward(pre.state, torch.tensor([tokens[:-1]]))
    return rules.apply(torch.cat([pre.last_logits[None], logits]), tokens, 0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arg(parser)
    rows = caption_logits(load_target(parser.parse_args().model, quiet=True))
    assert torch.equal(logits_to_probs(rows, TEMPERATURE, TOP_P), sorted_nucleus(rows))
    probs = torch.softmax(rows / TEMPERATURE, dim=-1)
    wide = int((probs.topk(NUCLEUS_GUESS, dim=-1).values.cumsum(-1)[:, -1] < TOP_P).sum())
    print(f"{torch.get_num_threads()} threads; {len(rows)} rows of {rows.shape[1]} tokens, temperature "
          f"{TEMPERATURE}, top-p {TOP_P}; {wide} of them have a nucleus wider than {NUCLEUS_GUESS} tokens")
    generator = torch.Generator().manual_seed(0)
    for n in (1, 5):
        batches = itertools.cycle([rows[i : i + n] for i in range(0, len(rows) - n + 1, n)])
        filtered = logits_to_probs(rows[:n], TEMPERATURE, TOP_P)
        print(f"{n} row(s), median ms: top-p by whole-row sort "
              f"{median_ms(lambda b=batches: sorted_nucleus(next(b))):.2f}, logits_to_probs "
              f"{median_ms(lambda b=batches: logits_to_probs(next(b), TEMPERATURE, TOP_P)):.2f}; "
              f"draw by torch.multinomial {median_ms(lambda f=filtered: torch.multinomial(f, 1)):.2f}, "
              f"sample {median_ms(lambda f=filtered: sample(f, generator)):.2f}")
