# Two commands: `make run` and `make test`. Both build .venv from nothing when it is missing,
# and reinstall only when pyproject.toml changed (the stamp files record the last install).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu
export KEDRO_DISABLE_TELEMETRY := true
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: run test viz benchmarks clean-data

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-$(EXTRAS): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed-$(EXTRAS)
	$(VENV)/bin/kedro run

test: $(VENV)/.installed-test
	$(PY) -m pytest

viz: $(VENV)/.installed-$(EXTRAS)
	$(VENV)/bin/kedro viz run --no-browser

# Each script exits 1 when it misses a target; the first one that does stops the loop and fails
# the target. Files starting with `_` are shared helpers, not benchmarks.
benchmarks: $(VENV)/.installed-test
	for script in benchmarks/[!_]*.py; do $(PY) $$script || exit 1; done

clean-data:
	find data -mindepth 2 ! -name .gitkeep -delete
