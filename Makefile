# The two commands of README: `make results` (set up, then run the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup results test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh scripts/constraints.txt
	bash scripts/setup.sh $(VENV)
	touch $@

# The main job: everything that has landed so far, on models built or shipped here.
results: setup
	$(PY) -m mllm.selfcheck --out results/selfcheck
	$(PY) -m grounding.demo --out results/grounding-demo
	$(PY) -m minillava.card data/minillava/spatial --eval-data data/minillava/eval
	$(PY) -m minillava.card data/minillava/contrastive --eval-data data/minillava/eval
	$(PY) -m minillava.card data/minillava/qwen2-vl --eval-data data/minillava/eval
	$(PY) scripts/execute_notebooks.py

test: setup
	$(PY) -m pytest
	$(VENV)/bin/ruff check .

lint: setup
	$(VENV)/bin/ruff check .
