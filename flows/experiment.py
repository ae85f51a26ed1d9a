"""Deployable entrypoint of the experiment flow (prefect.yaml points here).

The flow itself lives in the installed package (cq_prefect.experiment), so a deployment made from this
file or from the module path ``cq_prefect.experiment:experiment`` runs the same code on any host that
has cq-prefect installed.
"""

from cq_prefect.experiment import experiment

__all__ = ["experiment"]

if __name__ == "__main__":
    import json
    import sys

    from cq_prefect.spec import ExperimentSpec

    print(experiment(ExperimentSpec(**json.loads(sys.argv[1]))).model_dump_json(indent=2))
