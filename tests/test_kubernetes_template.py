"""deployments/kubernetes/cq-gpu-job-template.json: a prefect-kubernetes base job template with gpu_count.

No cluster and no prefect-kubernetes here: the template is rendered the way a Prefect worker renders it
(variable defaults, then job variables, then ``apply_values``) and the Job manifest it yields is checked;
the session's real Prefect server validates the template and the job variables. Where prefect-kubernetes
is installed, its own job configuration model builds the final manifest too.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import uuid
from pathlib import Path

import pytest

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "deployments" / "kubernetes" / "cq-gpu-job-template.json"
IMAGE = "registry.example.com/cq-prefect:src-1a2b3c4d5e6f"
MLFLOW = "http://mlflow.mlflow.svc.cluster.local:5000"
REQUIRED = {"image": IMAGE, "mlflow_tracking_uri": MLFLOW}


def template() -> dict:
    return json.loads(TEMPLATE_PATH.read_text())


def render(job_variables: dict) -> dict:
    """The job configuration a worker builds for a flow run with these job variables."""
    from prefect.utilities.schema_tools import validate
    from prefect.utilities.templating import apply_values

    base = template()
    validate(job_variables, base["variables"], raise_on_error=True)  # what the server checks for a flow run
    # As BaseJobConfiguration.from_template_and_values: defaults that are not None, then the job variables.
    values = {k: p["default"] for k, p in base["variables"]["properties"].items() if p.get("default") is not None}
    values.update(job_variables)
    return apply_values(base["job_configuration"], values)


def container(configuration: dict) -> dict:
    return configuration["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_gpu_count_renders_into_the_nvidia_gpu_limit_of_a_valid_job(gpus):
    configuration = render({**REQUIRED, "gpu_count": gpus, "name": "exp-044", "command": "prefect flow-run execute",
                            "env": {"CQ_EXTRA": "yes"}, "memory_limit": "16Gi"})
    manifest = configuration["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    assert manifest["metadata"]["generateName"] == "exp-044-" and manifest["metadata"]["namespace"] == "default"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and manifest["spec"]["backoffLimit"] == 0
    main = container(configuration)
    assert main["name"] == "prefect-job"  # prefect-kubernetes requires this container name
    assert main["image"] == IMAGE and main["imagePullPolicy"] == "IfNotPresent"
    assert shlex.split(main["args"]) == ["prefect", "flow-run", "execute"]  # the worker splits a string command
    limits = main["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpus and isinstance(limits["nvidia.com/gpu"], int)
    assert limits["memory"] == "16Gi" and "cpu" not in limits  # unset variables leave no key behind
    assert {"name": "MLFLOW_TRACKING_URI", "value": MLFLOW} in main["env"]
    assert all(set(item) == {"name", "value"} and isinstance(item["value"], str) for item in main["env"])
    assert configuration["env"] == {"CQ_EXTRA": "yes"}  # the worker puts these in front of main["env"]
    assert "{{" not in json.dumps(configuration)  # no placeholder left unresolved


def test_defaults_render_a_cpu_job_without_placeholders():
    configuration = render(dict(REQUIRED))
    assert container(configuration)["resources"]["limits"] == {"nvidia.com/gpu": 0}
    assert "args" not in container(configuration)  # the worker fills in its own command
    assert configuration["pod_watch_timeout_seconds"] == 900
    assert configuration["job_manifest"]["spec"]["ttlSecondsAfterFinished"] == 86400
    assert "{{" not in json.dumps(configuration)


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({**REQUIRED, "gpu_count": -1}, "-1 is less than the minimum of 0"),
        ({**REQUIRED, "gpu_count": 65}, "65 is greater than the maximum of 64"),
        ({**REQUIRED, "gpu_count": "2"}, "'2' is not of type 'integer'"),
        ({"image": IMAGE}, "'mlflow_tracking_uri' is a required property"),
    ],
)
def test_bad_job_variables_are_refused(bad, problem):
    from prefect.utilities.schema_tools import ValidationError

    with pytest.raises(ValidationError, match=re.escape(problem)):
        render(bad)


def test_the_prefect_server_accepts_the_template_and_checks_gpu_count(stack, prefect_client):
    """A real pool of type kubernetes on the session's server; flow runs are created, never run."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError

    from cq_prefect.deployment import ensure_experiment_deployment

    pool = f"k8s-{uuid.uuid4().hex[:6]}"
    prefect_client.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes", base_job_template=template()))
    try:
        deployment_id = ensure_experiment_deployment(pool, prefect_client)
        spec = {"name": "k8s", "workdir": "/workspace", "command": "python train.py"}
        with pytest.raises(PrefectHTTPStatusError, match=r"gpu_count.*-1 is less than the minimum of 0"):
            prefect_client.create_flow_run_from_deployment(
                deployment_id, parameters={"spec": spec}, job_variables={**REQUIRED, "gpu_count": -1}
            )
        flow_run = prefect_client.create_flow_run_from_deployment(
            deployment_id, parameters={"spec": spec}, job_variables={**REQUIRED, "gpu_count": 2}
        )
        try:
            work_pool = prefect_client.read_work_pool(pool)
            from prefect.workers.base import BaseJobConfiguration

            # Prefect's own rendering of the stored template + the run's variables, as a worker would.
            configuration = asyncio.run(
                BaseJobConfiguration.from_template_and_values(work_pool.base_job_template, flow_run.job_variables)
            )
            assert configuration.command is None  # the worker generates `prefect flow-run execute`
            assert render(flow_run.job_variables)["job_manifest"]["spec"]["template"]["spec"]["containers"][0][
                "resources"]["limits"]["nvidia.com/gpu"] == 2
        finally:
            prefect_client.delete_flow_run(flow_run.id)
    finally:
        prefect_client.delete_work_pool(pool)


def test_prefect_kubernetes_builds_the_final_manifest():
    """Only where prefect-kubernetes is installed (it is not a cq-prefect dependency)."""
    worker = pytest.importorskip("prefect_kubernetes.worker")
    from prefect.client.schemas.objects import FlowRun

    base = template()
    job_variables = {**REQUIRED, "gpu_count": 2, "env": {"CQ_EXTRA": "yes"}}
    configuration = asyncio.run(
        worker.KubernetesWorkerJobConfiguration.from_template_and_values(base, job_variables)
    )
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="exp-044"))
    main = configuration.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert main["args"] == ["prefect", "flow-run", "execute"]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 2
    env = {item["name"]: item.get("value") for item in main["env"]}
    assert env["MLFLOW_TRACKING_URI"] == MLFLOW and env["CQ_EXTRA"] == "yes" and "PREFECT__FLOW_RUN_ID" in env
