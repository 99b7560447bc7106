#!/usr/bin/env bash
# The serving benchmark behind docs/results/serving/serving.md, in stages whose rows land in one JSONL as they are
# measured (a rerun resumes where it stopped). On a 2-core CPU a 4k-token prefill of the 1.5B target takes about
# a minute, so cells are ordered by what the issue's targets need first; STAGES picks some.
#   STAGES="stall grid decode" bash scripts/serve_benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=docs/results/raw/bench-serve-cpu.jsonl
REPORT=docs/results/serving
CHUNK=${CHUNK:-128}  # the grid's --prefill-chunk (throughput; the stall stage measures the latency side)
PAUSE=${PAUSE:-/tmp/draftapprox-bench.pause}   # touch it to hold the next cell, rm it to go on
run() { draftapprox bench serve --output "$OUT" --report "$REPORT" --prefill-chunk "$CHUNK" --pause-file "$PAUSE" --targets scripts/targets/serving.toml "$@"; }
for stage in ${STAGES:-stall grid decode}; do
  case $stage in
    stall)  # the running stream's gaps while a 4k prompt is admitted, per prefill chunk
      run --methods fullkv --lengths 4096 --clients 1 --skip "fullkv|4096|1" --stall-chunks auto,16,32,64,128 ;;
    grid)   # the targets' cells first, then the rest of the grid
      run --methods fullkv,speckv@256,adaspeckv@256,specpc@0.25 --lengths 4096 --clients 1 --stall-chunks ""
      run --methods fullkv,specpc@0.25 --lengths 4096 --clients 4 --stall-chunks ""
      run --methods fullkv,speckv@256 --lengths 4096 --clients 8 --stall-chunks ""
      run --methods fullkv,speckv@256,adaspeckv@256,specpc@0.25 --lengths 2048 --clients 1,4 --stall-chunks ""
      run --methods speckv@256,adaspeckv@256 --lengths 4096 --clients 4 --stall-chunks ""
      run --methods fullkv,speckv@256,adaspeckv@256,specpc@0.25 --lengths 2048,4096 --clients 2 --stall-chunks ""
      ;;
    decode)  # eight 4k requests decoding together, the prefills done beforehand (scripts/serve_decode.py)
      python scripts/serve_decode.py --length 4096 --concurrency 8 --steps 32 --output "$OUT"
      run --methods fullkv --lengths 4096 --clients 1 --stall-chunks "" ;;  # rewrites the report
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
