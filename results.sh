#!/usr/bin/env bash
# The README's results table from scratch: train every row's run into out/results/NAME, then one
# eval.py call that evaluates them all on the same 200 test problems and prints the table rows.
#
#   bash results.sh     # in the quick start's venv: ~70 min of training, ~13 min of evaluation on 2 CPU cores
#
# A run that already has its summary.json is kept, so a stopped script picks up where it left off.
# The flags here are each row's; the table's first column repeats those that differ from defaults.
set -euo pipefail
cd "$(dirname "$0")"
out=out/results
names=()
run() {  # run NAME TRAIN_FLAGS...
    local name=$1
    shift
    names+=("$out/$name")
    [ -f "$out/$name/summary.json" ] || python train.py --out "$out/$name" "$@"
}
run lora --method lora
run lora16 --method lora --r 16 --alpha 32
run sara --method sara
run mosara --method mosara --lr 3e-2
run sora --method sora
run adalora --method adalora
run alora --method alora --rounds 3 --k2 10 --score-frac 0.125 --val-size 4
run salora --method salora
python eval.py --adapter "${names[@]}" --limit 200 --json "$out/results.json" --markdown
