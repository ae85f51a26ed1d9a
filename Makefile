# The two set-up commands of README.md. Each creates .venv and installs everything it needs on first use.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.cq-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cq demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python bench/metrics_pipeline.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
