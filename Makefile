# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   the main job on an embedded Ray (demo dataset -> validate -> prepare -> ...)
#   make test   the test suite
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
export RAY_DEDUP_LOGS ?= 0

.PHONY: venv demo test test-fast bench clean

$(BIN)/.ready: pyproject.toml scripts/setup-venv.sh
	VENV=$(VENV) bash scripts/setup-venv.sh
	touch $@

venv: $(BIN)/.ready

demo: venv
	$(BIN)/raytumor demo --dir $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -q --durations=15

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	$(BIN)/python benchmarks/run.py --json-dir benchmarks/results

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
