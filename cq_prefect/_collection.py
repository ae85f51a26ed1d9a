"""What Prefect loads through the ``prefect.collections`` entry point (pyproject.toml): cq's worker types.

Prefect imports this module when it looks a worker type up by name (``prefect worker start --type
cq-gpu``, the server listing worker types), so ``cq-gpu`` and ``cq-docker`` pools work with Prefect's
own commands. Nothing else imports it: flows and the cq CLI don't pay for the Docker client.
"""

from cq_prefect.gpu_worker import CqGpuWorker

try:
    from cq_prefect.docker_worker import CqDockerWorker
except ImportError:  # prefect-docker missing: cq-gpu still works
    CqDockerWorker = None

__all__ = ["CqGpuWorker", "CqDockerWorker"]
