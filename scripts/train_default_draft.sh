#!/usr/bin/env bash
# The default model's draft from nothing, in one command, on a 2-core CPU in about an hour:
#   bash scripts/train_default_draft.sh OUT_DIR [DATA_DIR]
# 1. self-distillation: two one-thread processes fill one cache (ITEMS training items, each answered
#    greedy and sampled, plus HELDOUT held-out items);
# 2. training: one process with two threads (measured faster than two one-thread processes averaging
#    gradients, which sync after every record), EPOCHS epochs, cross-entropy after the target's logits
#    rules (--rules-ce). Held-out tau per epoch lands in OUT_DIR/training_log.json.
# ITEMS / EPOCHS / HELDOUT / MAX_NEW_TOKENS (environment) trade time for quality, CE_WEIGHT sets
# --ce-weight (1.0, the CLI default); the README reports what the defaults give. The data cache is
# resumable: rerunning skips the records already made.
set -euo pipefail
OUT=${1:?usage: scripts/train_default_draft.sh OUT_DIR [DATA_DIR]}
DATA=${2:-${FLASH_CACHE:-$HOME/.cache/flash}/distill/default-recipe}
ITEMS=${ITEMS:-900}
EPOCHS=${EPOCHS:-3}
HELDOUT=${HELDOUT:-40}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
CE_WEIGHT=${CE_WEIGHT:-1.0}
start=$SECONDS
distill=(python -m flash train --out "$OUT" --data-dir "$DATA" --distill-only --train-items "$ITEMS"
         --heldout-items "$HELDOUT" --max-new-tokens "$MAX_NEW_TOKENS")
# one thread per process: two processes keep both cores busy
OMP_NUM_THREADS=1 "${distill[@]}" --shard 0/2 &
first=$!
OMP_NUM_THREADS=1 "${distill[@]}" --shard 1/2
wait "$first"
echo "distillation done in $((SECONDS - start)) s" >&2
OMP_NUM_THREADS=2 python -m flash train --train-only --data-dir "$DATA" \
    --epochs "$EPOCHS" --rules-ce --ce-weight "$CE_WEIGHT" --out "$OUT"
echo "recipe done in $((SECONDS - start)) s: draft in $OUT" >&2
