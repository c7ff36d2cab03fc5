#!/usr/bin/env bash
# The frontier shapes on one GPU, end to end in one call, records under $1 (default bench/results):
#   checks.log         first, the GPU tests: the CUDA plugin against the reference, stacks, a blocked layer
#                      decoded from host statistics (pytest and hypothesis from the image, or from wheels
#                      carried in .whl/: pip download --no-deps -d .whl pytest pluggy iniconfig packaging
#                      hypothesis sortedcontainers attrs)
#   budget_405b_cuda.json one 405B-shaped down_proj (16384 x 53248) alone, OJBKQ's statistics, the blocked form
#                      as a run takes it on this GPU (its rows, the sums on the host when they do not fit)
#   moe_stacked.json   a Qwen3-30B-A3B-shaped model (2 blocks), experts decoded together, 48-block projection
#   frontier_405b.json a Llama-3.1-405B-shaped block (16384 / 53248, 128/8 heads), 126-block projection
#   deepseek_v3.json   a DeepSeek-V3-shaped block (hidden 7168, 256 routed experts of 2048, top-8, one shared
#                      expert, Llama-style attention), 61-block projection
# Each step gets what is left of $BUDGET seconds (default 570) and its own limit; a step that fails (out of
# memory) leaves its log, and the next one runs. STEPS picks steps (default all); within the 10 minutes of one
# device call: STEPS=checks,layer405b,moe, then STEPS=405b_gptq,405b_ojbkq, then STEPS=deepseek_gptq, then
# STEPS=deepseek_ojbkq (its expert groups take many statistics passes: two copies of the block fill the GPU).
# The budgets are shares of the GPU's memory: ask for an H100 (80 GB) to show that the shapes fit one.
set -u
OUTDIR=${1:-bench/results}
BUDGET=${BUDGET:-570}
STEPS=${STEPS:-checks,layer405b,moe,405b_gptq,405b_ojbkq,deepseek_gptq,deepseek_ojbkq}
. "$(dirname "$0")/gpu_steps.sh"
QWEN3="--experts 128 --top-k 8 --moe-intermediate 768 --hidden 2048 --heads 32 --kv-heads 4 --head-dim 128 --intermediate 6144 --vocab 151936"
DSV3="--experts 256 --top-k 8 --moe-intermediate 2048 --shared-expert 2048 --hidden 7168 --heads 56 --kv-heads 8 --head-dim 128 --intermediate 18432 --vocab 129280"
step_shown() { step "$@"; [ -f "$OUTDIR/$1.log" ] && grep -v "it/s\|layer/s" "$OUTDIR/$1.log" | tail -n 6; }
case ",$STEPS," in *,checks,*)
  python3 -c 'import pytest, hypothesis' 2>/dev/null || pip install -q --no-index --find-links .whl pytest hypothesis ;;
esac
step_shown checks 150 env PYTHONPATH="$PYTHONPATH:plugins/ojbkq-cpu" python3 -m pytest -q -p no:cacheprovider \
  tests/test_cuda_plugin.py tests/test_budget.py tests/test_stack.py
step_shown layer405b 150 python3 bench/bench_budget.py --device cuda --shapes 16384x53248 --objective jta --forms blocked \
  --as-engine --label frontier --out "$OUTDIR/budget_405b_cuda.json"
step_shown moe 200 python3 bench/bench_model.py $QWEN3 --blocks 2 --project 48 --out "$OUTDIR/moe_stacked.json"
step_shown 405b_gptq 150 python3 bench/bench_model.py --preset 405b --blocks 1 --model-device cpu --recipes gptq --no-forwards \
  --project 126 --out "$OUTDIR/frontier_405b.json"
step_shown 405b_ojbkq 170 python3 bench/bench_model.py --preset 405b --blocks 1 --model-device cpu --recipes ojbkq --no-forwards \
  --project 126 --out "$OUTDIR/frontier_405b.json" --append
step_shown deepseek_gptq 300 python3 bench/bench_model.py $DSV3 --blocks 1 --model-device cpu --samples 64 --recipes gptq --no-forwards \
  --project 61 --out "$OUTDIR/deepseek_v3.json"
step_shown deepseek_ojbkq 560 python3 bench/bench_model.py $DSV3 --blocks 1 --model-device cpu --samples 64 --recipes ojbkq --no-forwards \
  --project 61 --out "$OUTDIR/deepseek_v3.json" --append
