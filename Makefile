# Entry points for a new user: `make setup`, `make demo`, `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-gpu test lint lock lock-gpu clean demo folds

$(VENV)/.installed: setup.py constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "This project needs Python 3.11; found " + sys.version.split()[0] + ". Run: make setup PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3  # pinned: the GPU lock test uses its fast-deps feature
	$(PY) -m pip install --quiet -c constraints.txt -e '.[synthetic,test]'
	@touch $@

setup: $(VENV)/.installed  ## create .venv and install the project with pinned versions

# GPU hosts (Linux): the same, with the CUDA build of TensorFlow (the `gpu` extra: nvidia-* wheels, several GB).
$(VENV)/.installed-gpu: setup.py constraints-gpu.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "This project needs Python 3.11; found " + sys.version.split()[0] + ". Run: make setup-gpu PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3  # pinned: the GPU lock test uses its fast-deps feature
	$(PY) -m pip install --quiet -c constraints-gpu.txt -e '.[gpu,synthetic,test]'
	@touch $@ $(VENV)/.installed

setup-gpu: $(VENV)/.installed-gpu  ## create .venv with the CUDA build of TensorFlow, pinned by constraints-gpu.txt

demo: $(VENV)/.installed  ## the main job: synthetic data -> preprocess -> train -> thresholds -> predict -> score
	DEMO_PYTHON=$(abspath $(PY)) ./run_demo.sh

# The demo's data and steps, the training, thresholds and prediction done by the fold driver (run_folds.sh).
folds: $(VENV)/.installed  ## the demo with one model per fold and their ensemble (reuses the demo's data)
	DEMO_PYTHON=$(abspath $(PY)) DEMO_FOLDS="$${DEMO_FOLDS:-0 1 2 3 4}" DEMO_REUSE_DATA="$${DEMO_REUSE_DATA:-1}" \
		DEMO_RUN_DIR="$${DEMO_RUN_DIR:-$${DEMO_DIR:-demo}/folds}" ./run_demo.sh

test: $(VENV)/.installed  ## run the test suite
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

lock:  ## regenerate constraints.txt from a fresh install of setup.py's ranges
	rm -rf /tmp/hpa-lock && $(PYTHON) -m venv /tmp/hpa-lock
	/tmp/hpa-lock/bin/pip install --quiet -e '.[synthetic,test]'
	( head -2 constraints.txt; /tmp/hpa-lock/bin/pip freeze --exclude-editable ) > constraints.txt.new && mv constraints.txt.new constraints.txt

# constraints-gpu.txt: what `.[gpu,test]` resolves to under constraints.txt's pins (so the two never differ on a
# shared package), read from pip's resolution report. Only metadata is fetched (fast-deps reads it from the
# wheels with HTTP range requests), not the GB-sized nvidia wheels. Run after `make lock`.
lock-gpu: $(VENV)/.installed  ## regenerate constraints-gpu.txt from setup.py's gpu extra and constraints.txt
	$(PY) -m pip install --dry-run --ignore-installed --quiet --use-feature=fast-deps \
		--report /tmp/hpa-lock-gpu.json -c constraints.txt '.[gpu,synthetic,test]'
	( head -4 constraints-gpu.txt; $(PY) -c 'import json, sys; r = json.load(open(sys.argv[1])); \
		print(*sorted((i["metadata"]["name"] + "==" + i["metadata"]["version"] for i in r["install"] \
		if "dir_info" not in i["download_info"]), key=str.lower), sep="\n")' /tmp/hpa-lock-gpu.json \
	) > constraints-gpu.txt.new && mv constraints-gpu.txt.new constraints-gpu.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
