#!/usr/bin/env bash
# The GPU part of the accuracy protocol (docs/spec/evaluation.md): 4k/8k/16k tokens, all 13 tasks, KV budgets
# up to 1024, on a CUDA device. Resumable like scripts/accuracy-grid.sh: every answer is appended to $OUTPUT as it
# finishes and a rerun skips what is there, so a short lease can fill the grid over several runs (answers come in
# sample-major order: each pass over the tasks and lengths completes before the next sample starts).
# The full protocol is the default; METHODS, BUDGETS and SAMPLES narrow it where device time is short. Further
# arguments go to `draftapprox eval` as they are (other models: --draft ID --target ID).
# SHARDS=N runs N processes side by side, each on every N-th sample with its own answer file (OUTPUT with
# -shardI-ofN before .jsonl) and log: one process drives a GPU one small kernel at a time and leaves it mostly idle.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
SAMPLES=${SAMPLES:-50}
LENGTHS=${LENGTHS:-4096,8192,16384}
BUDGETS=${BUDGETS:-128,256,512,1024,0.1,0.25,0.5}
METHODS=${METHODS:-fullkv,draft,streamingllm,snapkv,pyramidkv,adakv,speckv,adaspeckv,laq,speckvpc,specpc,targetpc,specprefill,randompc,recencypc}
OUTPUT=${OUTPUT:-docs/results/raw/ruler-gpu.jsonl}
CLI=${CLI:-draftapprox}
SHARDS=${SHARDS:-1}
grid() {  # output, shard, further arguments
  $CLI eval --device "$DEVICE" --lengths "$LENGTHS" --samples "$SAMPLES" --budgets "$BUDGETS" --methods "$METHODS" \
    --decode-batch 64 --output "$1" --shard "$2" "${@:3}"
}
if [ "$SHARDS" = 1 ]; then
  grid "$OUTPUT" 0/1 "$@"
else
  pids=()
  for ((i = 0; i < SHARDS; i++)); do
    out="${OUTPUT%.jsonl}-shard$i-of$SHARDS.jsonl"
    echo "shard $i/$SHARDS: answers in $out, log in ${out%.jsonl}.log"
    grid "$out" "$i/$SHARDS" "$@" > "${out%.jsonl}.log" 2>&1 &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  exit $status
fi
