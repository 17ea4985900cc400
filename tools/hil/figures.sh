#!/bin/bash
# HIL against `reled eval` of the same ONNX file (docs/hil.md §6): a fleet of HIL daemons, `reled hil run` at 20x
# for seeds 0-2, `reled eval --policy` on the same seeds. Resumable: a finished report is kept.
#   tools/hil/figures.sh SCENARIO MODEL.onnx NAME [LATENCY_BUDGET_MS]     (run from the repository root)
#   e.g. tools/hil/figures.sh cologne8 out/hil/models/reled-cologne8.onnx cologne8-b25 25
# then: .venv/bin/python tools/hil_results.py --dir out/hil --runs cologne8,cologne8-b25:cologne8,orlando
set -u
scenario=$1 model=$2 name=$3 budget=${4:-5}
B=.venv/bin
F=out/hil/fleet-$name
$B/reled-edge fleet down --dir $F >/dev/null 2>&1
rm -rf $F
$B/reled-edge fleet up --hil --no-collect --model $model --dir $F --latency-budget-ms $budget || exit 1
for seed in 0 1 2; do
  O=out/hil/$name-s$seed
  test -f $O/hil_report.json || $B/reled hil run --scenario $scenario --fleet $F --speed 20 --seed $seed --out $O
done
$B/reled-edge fleet down --dir $F
test -f out/hil/eval-$scenario.json || $B/reled eval --scenario $scenario --policy $model --seeds 3 \
    --json out/hil/eval-$scenario.json
