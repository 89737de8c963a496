# The course's commands. Every target sets up the virtual environment first (once).
#   make course   set up and open the course in JupyterLab
#   make test     set up and run every test: lint, unit tests, then nbval over every notebook
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
JOBS ?= 2

.PHONY: setup course test lint unit browser nbtest learner notebooks bench demo constraints format clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt "torch==2.13.0"
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# (as root, e.g. in a container, JupyterLab needs --allow-root)
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

course: setup
	$(BIN)/jupyter lab $(ROOT_FLAG) notebooks/00_setup.ipynb

test: setup lint unit browser nbtest

lint: setup
	$(BIN)/ruff check glm4moe_lib tests bench data
	$(BIN)/ruff format --check glm4moe_lib tests bench data

format: setup
	$(BIN)/ruff format glm4moe_lib tests bench data
	$(BIN)/ruff check --fix glm4moe_lib tests bench data

unit: setup
	$(BIN)/pytest tests -n $(JOBS) -m "not browser"

# JupyterLab + Voila driven by headless Chromium (skips with a message when no chromium is installed).
browser: setup
	$(BIN)/pytest -m browser tests/test_browser.py

nbtest: setup
	env -u MPLBACKEND $(BIN)/pytest $(NBVAL) -n $(JOBS) --dist loadfile notebooks/*.ipynb

# Re-run every lesson top to bottom and store the outputs (do this before committing a notebook).
notebooks: setup
	for nb in notebooks/*.ipynb; do \
	  PYTHONPATH=tests $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 \
	    --ExecutePreprocessor.kernel_manager_class=kernel_client.KernelManager "$$nb" || exit 1; \
	done

learner: setup
	$(PY) -m glm4moe_lib.exercises.learner --out notebooks/learner

constraints: setup
	( head -2 constraints.txt; $(PIP) freeze --exclude-editable | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' ) > constraints.new && mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache notebooks/learner

# The classroom playground as an app without code cells (Voila), for a projector.
demo: setup
	$(BIN)/voila notebooks/playground.ipynb --port=8866 --Voila.ip=127.0.0.1

bench: setup
	$(PY) -m glm4moe_lib.bench
