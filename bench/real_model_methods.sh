#!/usr/bin/env bash
# The training-free methods on the real model (issue 18's table): SmolLM2-135M-Instruct (trained at 8192)
# with each method at factor 4, no training; perplexity on held-out standard-library files and passkey
# retrieval (depths spread, trials per depth) at lengths past 8K. Every step is an ordinary longctx command.
#
#   bash bench/real_model_methods.sh [OUT] [PASSKEY_LENGTHS] [TRIALS_PER_DEPTH] [PPL_LENGTHS]
#   bash bench/real_model_methods.sh runs/methods 8k,16k 2 4k,8k,16k   # ~3 h on 2 AMD EPYC cores
#
# and prints the table (`python bench/methods_table.py OUT` prints it again; it reads whatever has finished).
# Needs `longctx pull smollm2-135m-instruct`.
set -euo pipefail
OUT=${1:-runs/methods}
PK_LENGTHS=${2:-8k}
TRIALS=${3:-4}
PPL_LENGTHS=${4:-4k,8k,16k}
MODEL=${MODEL:-smollm2-135m-instruct}
FACTOR=${FACTOR:-4}
METHODS=${METHODS:-"yarn ntk self-extend dual-chunk rerope"}
mkdir -p "$OUT"
timed() {  # timed NAME CMD...: runs CMD, appends "NAME seconds" to OUT/times.txt
  local name=$1; shift
  local t0=$(date +%s.%N)
  "$@"
  echo "$name $(echo "$(date +%s.%N) - $t0" | bc)" >> "$OUT/times.txt"
}
CKPTS=("$MODEL"); NAMES=none
for m in $METHODS; do
  [ -f "$OUT/$m/config.json" ] || longctx extend "$MODEL" --method "$m" --factor "$FACTOR" \
      --seq-len $((8192 * FACTOR)) --steps 0 --out "$OUT/$m"
  CKPTS+=("$OUT/$m"); NAMES+=",$m"
done
[ -f "$OUT/ppl/results.json" ] || timed ppl longctx eval ppl "${CKPTS[@]}" --names "$NAMES" \
    --lengths "$PPL_LENGTHS" --max-windows 1 --prefill-chunk 1024 --out "$OUT/ppl"
# one evaluation per (length, method), each with its own results.json: an interrupted run loses one at most
for L in ${PK_LENGTHS//,/ }; do
  for i in "${!CKPTS[@]}"; do
    name=$(echo "$NAMES" | cut -d, -f$((i + 1)))
    [ -f "$OUT/passkey-$L/$name/results.json" ] || timed "passkey-$L-$name" longctx eval passkey \
        "${CKPTS[$i]}" --names "$name" --lengths "$L" --depths 10,30,50,70,90 --trials "$TRIALS" \
        --prefill-chunk 1024 --quiet --out "$OUT/passkey-$L/$name"
  done
done
python "$(dirname "$0")/methods_table.py" "$OUT"
