#!/usr/bin/env bash
# Every GPU benchmark of bench/README.md in one go, results and logs under $1 (default bench/results):
#   layers.json + checks.json + profile.txt (bench_layers), model.json (bench_model 8B and 70B blocks,
#   bench_run: the whole 32-block model through `ojbkq quantize`), *.log.
# Each step gets what is left of a total budget of $BUDGET seconds (default 570), so one slow step
# cannot take the others with it; STEPS picks steps (default all: layers,model8b,run,model70b,model70b_pinned).
set -u
OUTDIR=${1:-bench/results}
BUDGET=${BUDGET:-570}
STEPS=${STEPS:-layers,model8b,run,model70b,model70b_pinned}
. "$(dirname "$0")/gpu_steps.sh"

step layers 170 python3 bench/bench_layers.py --shapes 4096x14336 --bits 4 --tf32 \
  --decoders babai,klein:k=16,beam:width=4 --profile "babai,klein:k=16,beam:width=4" --out "$OUTDIR/layers.json"
step model8b 110 python3 bench/bench_model.py --preset 8b --blocks 3 --out "$OUTDIR/model.json"
step run 240 python3 bench/bench_run.py --workdir /tmp/ojbkq_run --out "$OUTDIR/model.json" --append
step model70b 200 python3 bench/bench_model.py --preset 70b --blocks 2 --model-device cpu \
  --out "$OUTDIR/model.json" --append
step model70b_pinned 80 env OJBKQ_STREAMS=pinned python3 bench/bench_model.py --preset 70b --blocks 2 \
  --model-device cpu --recipes gptq --out "$OUTDIR/model.json" --append
[ -f /tmp/ojbkq_run/quantize.log ] && { echo "---- ojbkq quantize log (end)"; grep -v "layer/s" /tmp/ojbkq_run/quantize.log | tail -c 12000; } >> "$OUTDIR/run.log"

for f in layers model8b run model70b model70b_pinned; do
  [ -f "$OUTDIR/$f.log" ] && { echo "---- $f"; grep -v "it/s\|layer/s" "$OUTDIR/$f.log" | tail -n 14; }
done
