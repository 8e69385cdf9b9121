# One-command setup: every target installs what it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13 (a range in pyproject.toml allows others; this pins what CI runs).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint serve demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check .

# The whole test suite (what .ci/run runs).
test: install lint
	$(PY) -m pytest

# The server, all in one: embedded Redis, the API on http://127.0.0.1:8000 and a worker process.
# Uses the bundled 'shapes' model when present, else a small random-weight test model (noise images).
serve: install
	@if [ -f models/zoo/shapes/model_index.json ]; then \
	  $(VENV)/bin/diffuserve serve; \
	else \
	  [ -d .demo/test-model ] || $(VENV)/bin/diffuserve make-test-model .demo/test-model --scale small; \
	  $(VENV)/bin/diffuserve serve --model .demo/test-model; \
	fi

# Generate an image from the CLI. Until the bundled 'shapes' model lands (issue 3), this uses a small
# random-weight test model, so the picture is noise: it shows the pipeline end to end, not quality.
demo: install
	@if [ -f models/zoo/shapes/model_index.json ]; then \
	  $(VENV)/bin/diffuserve generate "a large red circle at the top left on a blue background" -o out.png; \
	else \
	  [ -d .demo/test-model ] || $(VENV)/bin/diffuserve make-test-model .demo/test-model --scale small; \
	  $(VENV)/bin/diffuserve generate "a red circle" --model .demo/test-model --steps 20 --seed 1 -o out.png; \
	fi

bench: install
	$(PY) bench/engine_vs_stock.py

clean:
	rm -rf $(VENV) .demo out.png .pytest_cache .ruff_cache
