"""The public surface: a curated __all__, lazy imports, and the CLI's commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cq_prefect
from conftest import run_cq

pytestmark = pytest.mark.prefect_db


def test_all_names_resolve_and_are_curated():
    assert cq_prefect.__all__ == sorted(cq_prefect.__all__)
    for name in cq_prefect.__all__:
        assert getattr(cq_prefect, name) is not None
    assert {"submit", "ExperimentSpec", "ExperimentResult", "MetricLogHandler", "experiment"} <= set(cq_prefect.__all__)
    assert not [name for name in cq_prefect.__all__ if name.startswith("_")]


def test_importing_the_package_does_not_import_prefect_or_mlflow():
    code = "import sys, cq_prefect, cq_prefect.cli; print('prefect' in sys.modules, 'mlflow' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.split() == ["False", "False"]


def test_cli_lists_every_command_of_this_release():
    output = run_cq("--help")
    assert output.returncode == 0
    # Each command starts its own line of the help's command list ("    pi        related knowledge …").
    listed = {line.split()[0] for line in output.stdout.splitlines() if line.startswith("    ") and line.strip()}
    assert {"up", "down", "status", "submit", "watch", "metrics", "worker", "dag", "loop", "note", "knowledge", "pi",
            "demo"} <= listed


def test_experiment_flow_is_registered_under_its_module_entrypoint():
    from prefect.utilities.importtools import import_object

    from cq_prefect.deployment import EXPERIMENT_ENTRYPOINT

    flow = import_object(EXPERIMENT_ENTRYPOINT)
    assert flow.name == "experiment"
    assert flow is cq_prefect.experiment
