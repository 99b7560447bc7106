#!/usr/bin/env bash
# Speculative decoding's figures (docs/results/speculative/), in stages whose rows land in JSONL files as they are
# measured (a rerun resumes): `decode`, batch-1 decode speed per method with and without the draft's proposals;
# `serve`, the server's throughput at 1 and 4 concurrent streams with and without them. STAGES picks some.
#   STAGES="decode serve" bash scripts/speculative_benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for stage in ${STAGES:-decode serve}; do
  case $stage in
    decode)
      python scripts/speculative_decode.py --raw docs/results/raw/speculative-cpu.jsonl \
        --out docs/results/speculative ;;
    serve)
      draftapprox bench serve --methods fullkv,fullkv+spec=auto,speckv@256,speckv@256+spec=auto \
        --lengths 2048 --clients 1,4 --stall-chunks "" --output docs/results/raw/bench-serve-speculative-cpu.jsonl \
        --report docs/results/speculative/serving ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
