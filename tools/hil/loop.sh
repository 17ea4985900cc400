#!/bin/bash
# The closed loop's figures (docs/hil.md §6): a run's export on a HIL fleet with its collector, `reled loop`.
#   tools/hil/loop.sh RUN MODEL.onnx [CYCLES]                             (run from the repository root)
#   e.g. tools/hil/loop.sh out/experiments/runs/reled-cologne8-moderate-s0 out/hil/models/reled-cologne8.onnx 2
set -u
run=$1 model=$2 cycles=${3:-2}
B=.venv/bin
F=out/hil/loop-fleet
$B/reled-edge fleet down --dir $F >/dev/null 2>&1
rm -rf $F
$B/reled-edge fleet up --hil --model $model --dir $F --latency-budget-ms 25 || exit 1
$B/reled loop --run $run --fleet $F --out out/hil/loop --cycles $cycles
status=$?
$B/reled-edge fleet down --dir $F
exit $status
