#!/usr/bin/env bash
# The robust-SpecKV study behind docs/results/robust-speckv.md (issue 25), resumable: every answer is appended to
# its JSONL as it finishes and a rerun skips what is there. The protocol: samples 0-4 of every task (--split dev)
# are where every idea is tried and every knob chosen; samples 5-9 (--split test) are answered once, by the chosen
# method, and never used to choose. FullKV, the draft alone, SpecKV, Ada-SpecKV and SnapKV come from the main grid
# (docs/results/raw/ruler-*-cpu.jsonl, same prompts, same precision), so only the candidates run here.
#   STAGES="screen test length report" bash scripts/robust-speckv.sh     (hours of this 2-core CPU)
# Timing (time to first token, decode step) is a separate stage on a quiet machine: STAGES=timing.
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=docs/results/raw
DEV=$RAW/robust-speckv-dev-2048.jsonl
DTYPE=${DTYPE:-bfloat16}
LENGTH_TASKS=niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery,vt,fwe  # the main grid's length check
# The chosen method, from the development study (docs/results/robust-speckv.md says why): VeriSpecKV's defaults,
# which became the study's choice (union, AdaKV's allocation, window=8) once it was made
CHOSEN=${CHOSEN:-verispeckv}
# Each idea alone, at the budget where SpecKV's gap is studied (128): the target's verification of the draft
# (alone, with the target's own correction tokens, with the draft's rewrite, with both), a fixed budget split with
# prompt-only scores, the two ways of normalising the sources, the draft-confidence and target-agreement gates, the
# budget-sized window, AdaKV's allocation, and the draft's whole answer scoring beside the verified one (union).
# Each is spelled against BASE, the verification as it was screened (SpecKV's window and allocation, no union).
# EARLY: the ideas dropped after the first two development samples of every task (26 prompts, budget 128), each
# 10 or more points behind the rest there (robust-speckv.md has their numbers); SCREEN: the rest, and the
# combinations of those that helped, on the development prompts at budgets 64/128/256 (one grid, so that every
# setting shares each prompt's prefill, draft answer and verification). The last of SCREEN is the choice.
BASE="allocation=uniform,union=false,window=32"
PLAIN="verify=false,redraft=0,correct=0,$BASE"
EARLY="verispeckv(redraft=0,correct=0,$BASE),verispeckv(redraft=0,$BASE),verispeckv($PLAIN,normalize=mass),\
verispeckv(redraft=0,correct=0,share=0.5,gate=agreement,$BASE)"
SCREEN="verispeckv(allocation=uniform,window=32),verispeckv(allocation=uniform),verispeckv($BASE),\
verispeckv(allocation=uniform,union=false),verispeckv(union=false,window=32),verispeckv(correct=0,$BASE),\
verispeckv($PLAIN,share=0.5),verispeckv($PLAIN,share=0.5,gate=margin),verispeckv($PLAIN,normalize=rank),\
verispeckv(union=false),verispeckv"
grid() { draftapprox eval --dtype "$DTYPE" --decode-batch 48 --samples 10 "$@"; }
for stage in ${STAGES:-screen test length report}; do
  case $stage in
    screen)  grid --split dev --samples 2 --lengths 2048 --budgets 128 --methods "$EARLY" --output "$DEV"
             grid --split dev --lengths 2048 --budgets 64,128,256 --methods "$SCREEN" --output "$DEV" ;;
    test|length|timing) [ -n "$CHOSEN" ] || { echo "set CHOSEN= to the method the development study chose" >&2; exit 2; } ;;&
    test)    grid --split test --lengths 2048 --budgets 64,128,256 --methods "$CHOSEN" \
               --output "$RAW/ruler-2048-cpu-robust.jsonl" ;;
    length)  grid --split test --lengths 4096 --budgets 256 --methods "$CHOSEN" --tasks "$LENGTH_TASKS" \
               --output "$RAW/ruler-4096-cpu-robust.jsonl" ;;
    timing)  # one benchmark run per prompt, SpecKV and the chosen method side by side (the bench protocol's
      # lookahead): a prompt whose draft answer holds (niah_multikey_1, the bench's own) and one where the target
      # rejects it (qa_1), which is where the verification costs a rewrite and the target's own tokens
      for task in niah_multikey_1 qa_1; do
        draftapprox bench --methods "speckv,$CHOSEN" --budgets 128 --lengths 2048 --repeats 3 --no-floors \
          --task "$task" --set speckv.lookahead=32 --set verispeckv.lookahead=32 \
          --output "$RAW/bench-robust-$task-cpu.jsonl"
      done ;;
    report)  # from whatever has been answered so far; without CHOSEN, the development study alone
      inputs=()
      for f in "$DEV" "$RAW"/ruler-2048-cpu.jsonl "$RAW"/speckv-settings-2048.jsonl "$RAW"/ruler-2048-cpu-robust.jsonl \
               "$RAW"/ruler-4096-cpu.jsonl "$RAW"/ruler-4096-cpu-robust.jsonl; do [ -f "$f" ] && inputs+=("$f"); done
      for f in "$RAW"/bench-robust-*-cpu.jsonl; do [ -f "$f" ] && inputs+=(--timing "$f"); done
      draftapprox eval study "${inputs[@]}" ${CHOSEN:+--chosen "$CHOSEN"} --out docs/results/robust-speckv.md \
        --targets scripts/targets/robust-speckv.toml \
        --command "STAGES=\"screen test length timing report\" CHOSEN=\"$CHOSEN\" scripts/robust-speckv.sh" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
