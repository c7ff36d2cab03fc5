# Sourced by the GPU scripts (run_gpu.sh, frontier.sh) once they set OUTDIR, BUDGET and STEPS: the project from
# its source folders (a GPU machine has it uninstalled), the versions, and `step NAME LIMIT CMD...`, which runs
# CMD with its log in $OUTDIR/NAME.log when NAME is in $STEPS, within LIMIT seconds and what is left of $BUDGET.
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH=.:adapters:plugins/ojbkq-cuda${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
nvidia-smi -L 2>/dev/null
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "tf32", torch.backends.cuda.matmul.allow_tf32)'
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
step() {
  local name=$1 limit=$2; shift 2
  case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
  local l; l=$(left); [ "$limit" -gt "$l" ] && limit=$l
  if [ "$limit" -le 10 ]; then echo "== $name: skipped (no time left)"; return 0; fi
  echo "== $name (limit ${limit}s)"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - t0 ))s"
}
