#!/usr/bin/env bash
# The README's results tables from scratch: train every row's run into out/results[-BENCH]/NAME, then
# one eval.py call that evaluates them all (and the base model) on the same test examples and
# prints the table rows.
#
#   bash results.sh               # the built-in task: ~70 min of training, ~13 min of evaluation on 2 CPU cores
#   bash results.sh math          # SARA's Table 1 at small scale: 40 steps on its math split, 20 problems per set
#   bash results.sh commonsense   # SARA's Table 2 at small scale: 40 per task to train on, 25 per task to test
#   bash results.sh shakespeare   # LoRA, 200 steps on 33 plays: perplexity on 4 held-out plays, before and after
#
# math reads $MATH_DATA: a directory in LLM-Adapters' layout (github.com/AGI-Edgerunners/LLM-Adapters),
# train.json from its ft-training_set/math_data.json and test_<set>.json from its dataset/<set>/test.json:
# python benchmarks.py math LLM-ADAPTERS-CLONE DIR builds it.
# A run that already has its summary.json is kept, so a stopped script picks up where it left off.
# The flags here are each row's; the table's first column repeats those that differ from defaults.
set -euo pipefail
cd "$(dirname "$0")"
bench=${1:-builtin}
case "$bench" in
    builtin)
        out=out/results
        train=()
        test=(--limit 200)
        alora=(--rounds 3 --k2 10 --score-frac 0.125 --val-size 4) ;;
    math)
        if [ -z "${MATH_DATA:-}" ]; then
            echo "bash results.sh math needs MATH_DATA=DIR, a directory in LLM-Adapters' layout (train.json, test_<set>.json)" >&2
            exit 2
        fi
        out=out/results-math
        train=(--data "$MATH_DATA" --steps 40 --seq-len 512)
        test=(--data "$MATH_DATA" --limit 20)
        alora=(--rounds 3 --k2 4 --score-frac 0.125 --val-size 4) ;;
    commonsense)
        out=out/results-commonsense
        train=(--task commonsense --limit 40 --steps 40)
        test=(--task commonsense --limit 25)
        alora=(--rounds 3 --k2 4 --score-frac 0.125 --val-size 4) ;;
    shakespeare)
        out=out/results-shakespeare
        train=(--task shakespeare --steps 200)
        test=(--task shakespeare --limit 20) ;;
    *)
        echo "usage: bash results.sh [builtin|math|commonsense|shakespeare]" >&2
        exit 2 ;;
esac
names=()
run() {  # run NAME TRAIN_FLAGS...
    local name=$1
    shift
    names+=("$out/$name")
    [ -f "$out/$name/summary.json" ] || python train.py --out "$out/$name" "${train[@]}" "$@"
}
run lora --method lora
if [ "$bench" != shakespeare ]; then  # perplexity before and after needs one adapter
    [ "$bench" != builtin ] || run lora16 --method lora --r 16 --alpha 32
    run sara --method sara
    run mosara --method mosara --lr 3e-2
    run sora --method sora
    run adalora --method adalora
    run alora --method alora "${alora[@]}"
    run salora --method salora
fi
python eval.py --adapter "${names[@]}" "${test[@]}" --json "$out/results.json" --markdown
