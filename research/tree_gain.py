"""Would tree drafts (EAGLE-2 / Medusa style) pay on this CPU? A prediction from measured parts.

A tree verifies several candidates per position in one target pass, so it raises τ but makes the
pass longer. This script measures both sides for the default model and the shipped draft:

1. the cost of a target forward over n tokens, relative to a one-token step (video context, as in
   ``research/verify_cost.py``);
2. on the held-out distillation records (greedy, teacher-forced, the target's logits rules applied
   with the true prefix): the rank of the emitted token in each slot's rule-processed draft
   distribution, and the draft's top probabilities.

From these it predicts τ and speed (τ over the step's cost: verification + the draft's share) for
the chain the engine runs (joint confidence cut T) and for dynamic trees (the N most confident
nodes by joint draft probability, cut at T). Run: ``python research/tree_gain.py``.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from default_run import add_model_arg  # noqa: E402 (a sibling script)
from verify_cost import forward_medians  # noqa: E402 (a sibling script)

from flash.engine.tree import build_tree  # noqa: E402
from flash.models import distill_dir, load_draft, load_target  # noqa: E402
from flash.training.distill import load_records  # noqa: E402
from flash.training.trainer import _sample_tensors  # noqa: E402

TOP, OUTSIDE = 6, 99  # candidates per slot; rank of a token the draft cannot propose
DRAFT_COST = 0.15  # a draft pass, in one-token target steps (measured: ~5-6 ms of ~38 ms)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
add_model_arg(parser)
args = parser.parse_args()
target = load_target(args.model, quiet=True)
draft = load_draft(target, quiet=True)
K = draft.cfg.k

# 1. verification cost by length
sizes = range(1, 14)
_, medians = forward_medians({"lean": target}, "coffee_rocket_cut.mp4", sizes, repeats=9)
cost = {n: medians["lean"][n] / medians["lean"][1] for n in sizes}
print("verify cost (x a one-token step):", " ".join(f"{n}:{c:.2f}" for n, c in cost.items()))

# 2. ranks and probabilities on the held-out records
records = [r for r in load_records(distill_dir(args.model), target.name) if r.split == "heldout"]
if not records:
    sys.exit("no held-out records: run `python -m flash train --distill-only` first")
rules = target.logits_rules()
positions = []  # (top probabilities [K, TOP], ranks of the emitted tokens [K])
with torch.no_grad():
    for rec in records:
        stream, gate, _ = _sample_tensors(draft, rec, 0.0, "cpu")
        preds = draft.train_forward(stream, gate)
        response = rec.response.tolist()
        valid = gate.shape[0] - 1  # slot i at response position r predicts response[r + 1 + i]
        probs = torch.zeros(valid, K, TOP)
        ranks = torch.full((valid, K), OUTSIDE)
        for i in range(K):
            rows = valid - i
            if rows <= 0:
                break
            full = rules.apply(draft.to_target_vocab(draft.draft_logits(preds[i, :rows]).float(), float("-inf")),
                               response, 1 + i)
            probs[:rows, i] = full.softmax(-1).topk(TOP, -1).values
            truth = full[torch.arange(rows), torch.tensor(response[1 + i : 1 + i + rows])]
            rank = (full > truth[:, None]).sum(-1)
            rank[~torch.isfinite(truth)] = OUTSIDE
            ranks[:rows, i] = rank
        positions += list(zip(probs, ranks.tolist(), strict=True))


def predict(select) -> tuple[float, float, float]:
    tau = spent = 0.0
    for probs, rank in positions:
        nodes = select(probs)
        accepted = 0
        while accepted < K and tuple(rank[: accepted + 1]) in nodes:
            accepted += 1
        tau += 1 + accepted
        spent += cost[min(1 + len(nodes), max(sizes))] + DRAFT_COST
    return tau / len(positions), spent / len(positions), tau / spent


def chain(cut: float):
    return tree(cut, K, branch=1)  # the chain is the one-branch tree cut at the joint confidence


def tree(cut: float, size: int, branch: int = TOP):
    """The engine's own tree building (flash.engine.tree.build_tree) over ranks: node = tuple of slot ranks."""
    def select(probs):
        built = build_tree(lambda depth, path: (list(range(TOP)), probs[depth - 1].tolist()), K, size, cut, branch)
        return {tuple(built.path(i)) for i in range(len(built))}
    return select


print(f"{len(records)} held-out records, {len(positions)} positions; speed = τ / (verify + draft {DRAFT_COST})")
for cut in (0.0, 0.05, 0.1):
    print(f"chain, cut {cut:<4}          τ {{:.3f}}  cost {{:.3f}}  speed {{:.3f}}".format(*predict(chain(cut))))
for cut in (0.02, 0.05, 0.1):
    for size in (3, 4, 5, 6, 8, 12):
        print(f"tree, cut {cut:<4} N {size:<3}    τ {{:.3f}}  cost {{:.3f}}  speed {{:.3f}}".format(
            *predict(tree(cut, size))))
