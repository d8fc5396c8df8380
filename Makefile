# Entry points for a new user: `make setup`, `make demo`, `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint lock clean demo folds

$(VENV)/.installed: setup.py constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "This project needs Python 3.11; found " + sys.version.split()[0] + ". Run: make setup PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

setup: $(VENV)/.installed  ## create .venv and install the project with pinned versions

demo: $(VENV)/.installed  ## the main job: synthetic data -> preprocess -> train -> thresholds -> predict -> score
	DEMO_PYTHON=$(abspath $(PY)) ./run_demo.sh

folds: $(VENV)/.installed  ## the demo with one model per fold and their ensemble (reuses the demo's data)
	DEMO_PYTHON=$(abspath $(PY)) ./run_folds.sh

test: $(VENV)/.installed  ## run the test suite
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

lock:  ## regenerate constraints.txt from a fresh install of setup.py's ranges
	rm -rf /tmp/hpa-lock && $(PYTHON) -m venv /tmp/hpa-lock
	/tmp/hpa-lock/bin/pip install --quiet -e '.[test]'
	( head -2 constraints.txt; /tmp/hpa-lock/bin/pip freeze --exclude-editable ) > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
