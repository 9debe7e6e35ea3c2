"""Teacher-forced and real τ of a draft on given media, one line each: does the draft know the subject?

For each image or video (the default request, greedy, 128 tokens at most): the caption's length, the
chain's teacher-forced τ (the draft's k guesses at every position of the target's own caption, as
training's held-out evaluation computes it) with its slot hit rates, and the τ real ``flash`` decoding
reaches on it with no confidence cut (``min_draft_prob`` 0): tokens per step rather than a mean over
positions, so the two differ a little, but a large gap would mean the loop feeds the draft something
other than what training does. Run: ``python research/media_tau.py [--model M] [--draft DIR]
MEDIA...``; e.g. the shipped examples (subjects in the training corpus) against photos of other subjects.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from default_run import add_model_arg  # noqa: E402 (a sibling script)

from flash.engine import GenerationConfig, collect, generate  # noqa: E402
from flash.media import MediaError, load_media  # noqa: E402
from flash.models import load_draft, load_target  # noqa: E402
from flash.training.distill import Record  # noqa: E402
from flash.training.trainer import TrainConfig, chain_tau, record_loss  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("media", nargs="+", help="images or videos")
add_model_arg(parser)
parser.add_argument("--draft", default=None, help="a saved draft (default: the model's shipped one)")
parser.add_argument("--max-new-tokens", type=int, default=128)
args = parser.parse_args()
target = load_target(args.model, quiet=True)
draft = load_draft(target, args.draft, quiet=True)
rules = target.logits_rules()
taus = []
torch.set_grad_enabled(False)
for path in args.media:
    try:
        media = load_media(path)
    except MediaError as exc:
        sys.exit(f"error: {exc}")
    prompt = target.build_prompt(media, target.default_prompt(media))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, rules=rules, min_draft_prob=0.0)
    real = collect(generate(target, prompt, "flash", draft, config))
    # h over prompt + caption, as distillation records it: the caption fed back in one pass.
    pre = target.prefill(prompt)
    _, hidden = target.forward(pre.state, torch.tensor([list(real.tokens)]))
    record = Record(prompt.input_ids[0], tuple(prompt.media_spans), torch.tensor(real.tokens),
                    torch.cat([pre.hidden, hidden]).half(), "heldout", media.kind)
    _, hits = record_loss(draft, record, TrainConfig(), target.device, noise=0.0, rules=rules)
    tau, rates = chain_tau(hits, draft.cfg.k)
    taus.append(tau)
    print(f"{Path(path).name}: {real.new_tokens} tokens, teacher-forced tau {tau:.2f} "
          f"(slot hits {' / '.join(f'{r:.2f}' for r in rates)}), real flash tau {real.tau:.2f}", flush=True)
print(f"mean teacher-forced tau {sum(taus) / len(taus):.2f} over {len(taus)} media")
