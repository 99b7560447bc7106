#!/usr/bin/env bash
# The performance protocol on the offline pair, resumable (rows already in the JSONL are skipped). Timings are
# only comparable within one file measured on an otherwise idle machine: stop other jobs first.
# STAGES (default: all) picks what to run, e.g. STAGES="main report".
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=docs/results/raw
OUT=$RAW/bench-cpu.jsonl
STAGES=${STAGES:-"main long chunk int8 report"}
METHODS=fullkv,streamingllm,snapkv,adakv,speckv,specpc,speckvpc,specprefill
LOOKAHEAD=(--set speckv.lookahead=32 --set speckvpc.lookahead=32)
mkdir -p "$RAW"
for stage in $STAGES; do
  case $stage in
    main)   # every method, 1k-4k tokens, median of 3 after a warm-up
      draftapprox bench --methods "$METHODS" --budgets 256,0.25 --lengths 1024,2048,4096 --repeats 3 \
        "${LOOKAHEAD[@]}" --output "$OUT" ;;
    long)   # 8k tokens: one timed run each (a FullKV prefill alone takes minutes here)
      draftapprox bench --methods fullkv,snapkv,speckv,specpc --budgets 256,0.25 --lengths 8192 --repeats 1 \
        "${LOOKAHEAD[@]}" --output "$OUT" ;;
    chunk)  # the same prefill unchunked, to show what chunking costs and saves
      draftapprox bench --methods fullkv --no-floors --lengths 2048,4096,8192 --repeats 1 --prefill-chunk 1000000 \
        --output "$OUT" ;;
    int8)   # SpecPC with a dynamically quantised int8 draft
      draftapprox bench --methods specpc --budgets 0.25 --lengths 1024,2048,4096 --repeats 3 --draft-dtype int8 \
        --output "$OUT" ;;
    report)
      draftapprox bench report "$OUT" --out docs/results --command "scripts/benchmark.sh (STAGES=\"$STAGES\")" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
