#!/usr/bin/env bash
# The README's results tables from scratch: train every row's run into out/results[-BENCH]/NAME, then
# one eval.py call that evaluates them all (and the base model) on the same test examples and
# prints the table rows.
#
#   bash results.sh               # the built-in task, 3 seeds, bf16: ~100 min of training, ~25 min of evaluation on 2 CPU cores
#   bash results.sh long          # the built-in task at 600 steps (4x), seed 0: LoRA r=8 and r=16, Mo-SARA, SoRA, SaLoRA
#   bash results.sh math          # SARA's Table 1 at small scale: 40 steps on its math split, 20 problems per set
#   bash results.sh commonsense   # SARA's Table 2 at small scale: 40 per task to train on, 25 per task to test
#   bash results.sh shakespeare   # LoRA, 200 steps on 33 plays: perplexity on 4 held-out plays, before and after
#
# math reads $MATH_DATA: a directory in LLM-Adapters' layout (github.com/AGI-Edgerunners/LLM-Adapters),
# train.json its ft-training_set/math_data.json and test_<set>.json its dataset/<set>/test.json less
# those training problems (the paper's 816): python benchmarks.py math LLM-ADAPTERS-CLONE DIR builds it.
# A run that already has its summary.json is kept, so a stopped script picks up where it left off.
# The flags here are each row's; the table's first column repeats those that differ from defaults.
set -euo pipefail
cd "$(dirname "$0")"
bench=${1:-builtin}
case "$bench" in
    builtin)
        out=out/results
        seeds=${SEEDS:-0 1 2}
        train=(--dtype bf16)
        test=(--limit 200 --dtype bf16) ;;
    long)
        out=out/results-600
        train=(--dtype bf16 --steps 600)
        test=(--limit 200 --dtype bf16) ;;
    math)
        if [ -z "${MATH_DATA:-}" ]; then
            echo "bash results.sh math needs MATH_DATA=DIR, a directory in LLM-Adapters' layout (train.json, test_<set>.json)" >&2
            exit 2
        fi
        out=out/results-math
        train=(--data "$MATH_DATA" --steps 40 --seq-len 512)
        test=(--data "$MATH_DATA" --limit 20) ;;
    commonsense)
        out=out/results-commonsense
        train=(--task commonsense --limit 40 --steps 40)
        test=(--task commonsense --limit 25) ;;
    shakespeare)
        out=out/results-shakespeare
        train=(--task shakespeare --steps 200)
        test=(--task shakespeare --limit 20) ;;
    *)
        echo "usage: bash results.sh [builtin|long|math|commonsense|shakespeare]" >&2
        exit 2 ;;
esac
names=()
seeds=${seeds:-0}
run() {  # run NAME TRAIN_FLAGS...: this seed's run, into NAME-sSEED when there are several seeds
    local name=$1 dir=$out/$1
    shift
    [ "$seeds" = 0 ] || dir=$out/$name-s$seed
    names+=("$dir")
    [ -f "$dir/summary.json" ] || python train.py --out "$dir" --seed "$seed" "${train[@]}" "$@"
}
for seed in $seeds; do  # every row once before any row twice: a stopped script has whole seeds
    run lora --method lora
    if [ "$bench" = long ]; then  # the run-length check: the methods whose gates travel, and their LoRAs
        run lora16 --method lora --r 16 --alpha 32
        run mosara --method mosara
        run sora --method sora
        run salora --method salora
    elif [ "$bench" != shakespeare ]; then  # perplexity before and after needs one adapter
        [ "$bench" != builtin ] || run lora16 --method lora --r 16 --alpha 32
        run sara --method sara
        run mosara --method mosara  # at its TRAINING lr, 3e-2
        run sora --method sora
        run adalora --method adalora
        run alora --method alora
        run salora --method salora
    fi
done
python eval.py --adapter "${names[@]}" "${test[@]}" --json "$out/results.json" --markdown
