# The two set-up commands of README.md. Each creates .venv and installs everything it needs on first use.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.cq-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	# No GPU here: take the CPU build of torch first (the project's own requirement is a range, so GPU
	# hosts keep their CUDA build; a bare `torch` would pull a 3 GB CUDA build onto a CPU machine).
	command -v nvidia-smi >/dev/null || $(VENV)/bin/python -m pip install --quiet "torch==2.13.0"
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cq demo

# The whole suite but the team stage with the Prefect server on SQLite, then a second pass of the tests that exercise workers
# and experiments (marker prefect_db) with the server on PostgreSQL: CQ_TEST_PREFECT_DB=postgres makes a
# fresh database on CQ_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test) and drops it.
# Third, the team stage (marker team): the team profile as hosts in network namespaces (cq_prefect.lab),
# with the multi-host, load and fault tests.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not team"
	CQ_TEST_PREFECT_DB=postgres $(VENV)/bin/python -m pytest -q -m prefect_db
	$(VENV)/bin/python -m pytest -q -rA -m team

bench: $(STAMP)
	$(VENV)/bin/python bench/metrics_pipeline.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
