#!/usr/bin/env bash
# The FP4 tables (bench/README.md, "FP4 grids"): SmolLM2 on one FP4 format, rtn and four recipes, each with
# and without the Hadamard rotation, as one `ojbkq compare` that writes fp4_<FORMAT>_<DEVICE>.{json,txt,png,md}.
#   bench/fp4_tables.sh nvfp4 [OUTDIR]        # DEVICE=cuda (default) or cpu; MODEL=smollm2 (default) or gemma3;
#                                             # RECIPES="rtn gptq ojbkq" for fewer rows
set -u
FMT=${1:?usage: bench/fp4_tables.sh nvfp4|mxfp4 [OUTDIR]}
OUTDIR=${2:-bench/results}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-smollm2}
RECIPES=${RECIPES:-rtn gptq gptaq regularized-beam ojbkq}
case "$FMT" in nvfp4) G=16 ;; mxfp4) G=32 ;; *) echo "format: nvfp4 or mxfp4" >&2; exit 2 ;; esac
NAME=fp4_${FMT}_${DEVICE}; [ "$MODEL" != smollm2 ] && NAME=fp4_${MODEL}_${FMT}_${DEVICE}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH=.:adapters:plugins/ojbkq-cpu${PYTHONPATH:+:$PYTHONPATH}     # the project from its source folders
python3 -m ojbkq_core.cli compare --model "$MODEL" --cache-dir "${CACHE:-/tmp/cache}" --device "$DEVICE" --bits 4 \
  --group-size "$G" --set quant.grid="$FMT" --recipes $RECIPES \
  --rotations none hadamard --out "$OUTDIR/$NAME.json"
