#!/usr/bin/env bash
# An embedded model's draft from nothing, in one command, on a 2-core CPU in about an hour:
#   bash scripts/train_default_draft.sh OUT_DIR [DATA_DIR]
# 1. self-distillation: two one-thread processes fill one cache (training items of the built-in corpus,
#    each answered greedy and sampled, plus HELDOUT held-out items);
# 2. training: one process with two threads (measured faster than two one-thread processes averaging
#    gradients, which sync after every record), cross-entropy after the target's logits rules
#    (--rules-ce). Held-out tau per epoch lands in OUT_DIR/training_log.json.
# Sizes follow the clock, so the recipe fits its time on a slow day and uses a fast one: MINUTES (55)
# is the whole run; distillation makes training records for DISTILL_SHARE (0.5) of it (at most ITEMS
# items, 2400), then training takes what is left, less a minute for loading the records and the last
# evaluation. MINUTES=0 sizes the run by count instead: ITEMS (900) items, EPOCHS (3) epochs.
# MODEL (smollm2: the recipe was measured on it; 'default' is Qwen2.5, ~4x slower to distil),
# HELDOUT / MAX_NEW_TOKENS (environment) set the rest, CE_WEIGHT --ce-weight (1.0, the CLI default);
# the README reports what the defaults give. The data cache is resumable: rerunning skips the records
# already made.
set -euo pipefail
OUT=${1:?usage: scripts/train_default_draft.sh OUT_DIR [DATA_DIR]}
DATA=${2:-${FLASH_CACHE:-$HOME/.cache/flash}/distill/default-recipe}
MINUTES=${MINUTES:-55}
MODEL=${MODEL:-smollm2}
DISTILL_SHARE=${DISTILL_SHARE:-0.5}
HELDOUT=${HELDOUT:-40}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
CE_WEIGHT=${CE_WEIGHT:-1.0}
number='^[0-9]+([.][0-9]+)?$'
[[ $MINUTES =~ $number ]] || { echo "error: MINUTES must be a number of minutes, not '$MINUTES'" >&2; exit 2; }
[[ $DISTILL_SHARE =~ $number ]] && awk "BEGIN { exit !($DISTILL_SHARE > 0 && $DISTILL_SHARE < 1) }" ||
    { echo "error: DISTILL_SHARE must be a fraction between 0 and 1, not '$DISTILL_SHARE'" >&2; exit 2; }
if awk "BEGIN { exit !($MINUTES == 0) }"; then
    ITEMS=${ITEMS:-900}
    limit=()
    length=(--epochs "${EPOCHS:-3}")
else
    ITEMS=${ITEMS:-2400}
    limit=(--distill-minutes "$(awk "BEGIN { print $MINUTES * $DISTILL_SHARE }")")
fi
start=$SECONDS
distill=(python -m flash train --model "$MODEL" --out "$OUT" --data-dir "$DATA" --distill-only --train-items "$ITEMS"
         --heldout-items "$HELDOUT" --max-new-tokens "$MAX_NEW_TOKENS" "${limit[@]}")
# one thread per process: two processes keep both cores busy
OMP_NUM_THREADS=1 "${distill[@]}" --shard 0/2 &
first=$!
OMP_NUM_THREADS=1 "${distill[@]}" --shard 1/2
wait "$first"
echo "distillation done in $((SECONDS - start)) s" >&2
if [ ${#limit[@]} -gt 0 ]; then
    # what is left of MINUTES, less a minute for loading and the final evaluation; at least 0.2 minutes
    left=$(awk "BEGIN { m = $MINUTES - ($SECONDS - $start) / 60 - 1; print (m > 0.2 ? m : 0.2) }")
    length=(--train-minutes "$left")
fi
OMP_NUM_THREADS=2 python -m flash train --model "$MODEL" --train-only --data-dir "$DATA" \
    "${length[@]}" --rules-ce --ce-weight "$CE_WEIGHT" --out "$OUT"
echo "recipe done in $((SECONDS - start)) s: draft in $OUT" >&2
