#!/usr/bin/env bash
# The accuracy protocol of docs/spec/evaluation.md on the offline pair, resumable: rerun it and it continues
# where it stopped (every answer is appended to a JSONL file as it finishes). Hours of CPU time; run it in the
# background (`nohup scripts/accuracy-grid.sh > grid.log 2>&1 &`) and commit docs/results as it fills.
# STAGES (default: all) picks what to run, e.g. STAGES="main report".
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=docs/results/raw
DTYPE=${DTYPE:-bfloat16}
LENGTH_TASKS=niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery,vt,fwe  # the protocol's length check
# The goal figures' comparisons come first: kvpress query-aware and LongLLMLingua at 0.25 (the goal's ratio) at
# 2,048 tokens, then the length check (about five hours) and kvpress at its length and budget. LongLLMLingua's
# other ratios (about 70 s an answer here) and kvpress's query-agnostic pipeline come last.
STAGES=${STAGES:-"main kvpress selection llmlingua length kvpress-length llmlingua-rest kvpress-agnostic kvpress-speckv report"}
mkdir -p "$RAW"
for stage in $STAGES; do
  case $stage in
    main)    # 13 tasks x 10 samples at 2048 tokens; KV budgets 64/128/256, keep ratios 0.1/0.25/0.5
      draftapprox eval --dtype "$DTYPE" --decode-batch 48 --lengths 2048 --samples 10 --output "$RAW/ruler-2048-cpu.jsonl" ;;
    length)  # the length check at 4096 tokens
      draftapprox eval --dtype "$DTYPE" --decode-batch 48 --lengths 4096 --samples 10 --budgets 128,256,0.25 \
        --tasks "$LENGTH_TASKS" \
        --output "$RAW/ruler-4096-cpu.jsonl" ;;
    kvpress)  # query-aware (the question inside the compressed context, as kvpress's own evaluation does): the
      # numbers our methods are compared with; one prefill per context, shared by every press and budget
      draftapprox eval setup-peer kvpress
      draftapprox eval kvpress --modes aware --budgets 128,256 --samples 5 --output "$RAW/ruler-2048-cpu-kvpress.jsonl" ;;
    kvpress-length)  # the goal's "same ordering at 4096/256", on the length check's tasks
      draftapprox eval setup-peer kvpress
      draftapprox eval kvpress --modes aware --budgets 256 --lengths 4096 --samples 5 \
        --tasks "$LENGTH_TASKS" \
        --output "$RAW/ruler-4096-cpu-kvpress.jsonl" ;;
    kvpress-agnostic)  # kvpress's pipeline as users call it: the context compressed before the question is seen
      draftapprox eval setup-peer kvpress
      draftapprox eval kvpress --modes agnostic --budgets 128,256 --samples 5 --output "$RAW/ruler-2048-cpu-kvpress.jsonl" ;;
    kvpress-speckv)  # our SpecKV as a press inside kvpress's own pipeline (integrations.kvpress), both ways
      draftapprox eval setup-peer kvpress
      draftapprox eval kvpress --presses speckv --modes aware,agnostic --budgets 128 --samples 5 \
        --output "$RAW/ruler-2048-cpu-kvpress.jsonl"
      draftapprox eval kvpress --presses speckv,adaspeckv --modes aware --budgets 128 --samples 5 \
        --set tail=pipeline --output "$RAW/ruler-2048-cpu-kvpress.jsonl" ;;
    selection)  # why kvpress and we disagree: kept pairs compared, one difference per case (float32 target)
      draftapprox eval kvpress-selection --tasks niah_single_1,niah_multikey_1,niah_multivalue,vt,fwe,qa_1 \
        --output "$RAW/kvpress-selection-2048.jsonl" --report docs/results/kvpress-selection.md \
        --command "draftapprox eval kvpress-selection --tasks niah_single_1,niah_multikey_1,niah_multivalue,vt,fwe,qa_1 --output $RAW/kvpress-selection-2048.jsonl" ;;
    llmlingua|llmlingua-rest)
      draftapprox eval setup-peer llmlingua
      # the goal's ratio on every prompt; the other two on 5 samples a task, as kvpress (about 70 s an answer here)
      if [ "$stage" = llmlingua ]; then ratios=0.25 samples=10; else ratios=0.1,0.5 samples=5; fi
      draftapprox eval llmlingua --ratios "$ratios" --samples "$samples" --output "$RAW/ruler-2048-cpu-llmlingua.jsonl" ;;
    report)
      draftapprox eval report "$RAW"/ruler-*-cpu*.jsonl --out docs/results \
        --command "DTYPE=$DTYPE scripts/accuracy-grid.sh   # every stage; a rerun resumes what is unfinished" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
