"""The ``cq`` command line. Exit codes: 0 success, 1 the work failed, 2 bad input (message names the fix)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from cq_prefect.errors import CqError, SpecError


def _key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"{flag} expects KEY=VALUE, got {item!r}; e.g. {flag} LR=0.1")
        result[key] = value
    return result


def _params(items: list[str] | None) -> dict[str, object]:
    params: dict[str, object] = {}
    for key, value in _key_values(items, "--param").items():
        params[key] = _number_or_text(value)
    return params


def _number_or_text(value: str) -> object:
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value


def cmd_up(args) -> int:
    from cq_prefect.stack import StackConfig, up

    config = StackConfig.from_env(args.prefect_port, args.mlflow_port, args.pool)
    endpoints = up(config, worker=not args.no_worker)
    print(json.dumps(endpoints.__dict__, indent=2) if args.json else
          f"Prefect UI: {endpoints.prefect_ui_url}\nMLflow UI:  {endpoints.mlflow_ui_url}\nPool:       {config.pool}")
    return 0


def cmd_down(args) -> int:
    from cq_prefect.stack import down

    down()
    return 0


def cmd_status(args) -> int:
    from cq_prefect.stack import status

    report = status()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ok = lambda flag: "up" if flag else "DOWN"  # noqa: E731
    print(f"Prefect  {ok(report['prefect_healthy']):4}  {report['prefect_api_url']}  (UI {report['prefect_ui_url']})")
    print(f"MLflow   {ok(report['mlflow_healthy']):4}  {report['mlflow_tracking_uri']}")
    for name, pid in report["processes"].items():
        print(f"process  {name} pid {pid}")
    sources = report["auth"]  # the variables that hold the credentials, never their values
    print("auth     " + (", ".join(f"{server} from {var}" for server, var in sources.items() if var) or "none"))
    for worker in report["workers"]:
        print(f"worker   {worker['name']} pool={worker['pool']} status={worker['status']}")
    if not report["workers"]:
        print("workers  none (start one: cq worker start --pool local)")
    return 0


def cmd_submit(args) -> int:
    from cq_prefect.submission import make_spec, submit, watch

    spec = make_spec(
        name=args.name,
        workdir=args.workdir,
        command=args.command,
        gpu_count=args.gpu_count,
        exp_id=args.exp_id,
        env=_key_values(args.env, "--env"),
        tags=args.tag or [],
        timeout=args.timeout,
        params=_params(args.param),
    )
    handle = submit(spec, pool=args.pool, check_workdir=not args.remote_workdir)
    code = 0
    if args.watch:
        code = watch(handle, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(handle.as_json()))
    elif not args.watch:
        print(f"Submitted {handle.exp_id} (flow run {handle.flow_run_name}, {handle.flow_run_id})")
        print(f"MLflow run {handle.mlflow_run_id}")
        print(f"Follow it: cq watch {handle.exp_id}")
    return code


def cmd_watch(args) -> int:
    from cq_prefect.submission import resolve, watch

    return watch(resolve(args.run))


def cmd_metrics(args) -> int:
    from cq_prefect.submission import metrics_for
    from cq_prefect.tracking import json_safe

    metrics = metrics_for(args.run, history=args.history)
    if args.json:
        print(json.dumps(json_safe(metrics), indent=2))
        return 0
    if not metrics:
        print(f"{args.run}: no metrics recorded")
        return 0
    print(f"{'metric':24} {'final':>12} {'min':>12} {'max':>12} {'points':>7}  unit")
    for key, m in metrics.items():
        fmt = lambda v: f"{v:12.6g}" if not math.isnan(v) else f"{'nan':>12}"  # noqa: E731
        print(f"{key:24} {fmt(m['final'])} {fmt(m['min'])} {fmt(m['max'])} {m['count']:7d}  {m['unit'] or ''}")
    return 0


def cmd_worker_start(args) -> int:
    from cq_prefect.gpus import parse_gpus
    from cq_prefect.stack import check_mlflow_api, connect, prefect_settings

    inventory = parse_gpus(args.gpus)  # bad --gpus: exit 2 before anything starts
    # Before Prefect is imported (it reads settings once): a client that has connected retries connection
    # errors for ~4 minutes instead of ~1, so this worker and its runs (which inherit it) ride out a
    # Prefect server that is away for a while.
    import os

    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "7")
    if args.limit is not None and args.limit < 1:
        raise SpecError(f"--limit {args.limit}: give at least 1 (runs at once on this worker), or leave it out")
    endpoints = connect(worker=False)
    check_mlflow_api(endpoints.mlflow_tracking_uri)  # refused credentials or Host header: exit before serving
    from cq_prefect.auth import check_prefect

    check_prefect(endpoints.prefect_api_url)
    with prefect_settings(endpoints):
        from cq_prefect.deployment import ensure_experiment_deployment, require_pool_type
        from cq_prefect.gpu_worker import WORKER_TYPE, serve

        from cq_prefect.crash import ensure_crash_automation

        require_pool_type(args.pool, WORKER_TYPE)
        ensure_experiment_deployment(args.pool)
        ensure_crash_automation()  # runs whose process dies with this host become Crashed (cq_prefect.crash)
        print(f"cq: worker for pool '{args.pool}' → {endpoints.prefect_api_url}", file=sys.stderr, flush=True)
        return serve(args.pool, gpus=inventory, name=args.name, limit=args.limit,
                     printer=lambda msg: print(msg, file=sys.stderr, flush=True))


def _dag_file(path: str):
    from cq_prefect.dag_spec import load_dag

    dag = load_dag(path)
    folder = Path(path).expanduser().absolute().parent
    return dag, Path(path).read_text(encoding="utf-8"), str(folder)


def cmd_dag_validate(args) -> int:
    dag, _, _ = _dag_file(args.file)
    print(dag.plan_text())
    return 0


def cmd_dag_run(args) -> int:
    from cq_prefect.dag_submission import submit_dag
    from cq_prefect.submission import watch

    if args.parallel is not None and args.parallel < 1:
        raise SpecError(f"--parallel {args.parallel}: give at least 1 (nodes at once)")
    dag, content, folder = _dag_file(args.file)
    handle = submit_dag(dag, content, folder, pool=args.pool, resume=args.resume, max_parallel=args.parallel)
    if not args.json:
        print(f"Submitted DAG {dag.name} (flow run {handle.flow_run_name}, {handle.flow_run_id})"
              + (f", resuming {args.resume}" if args.resume else ""))
    code = 0
    if args.watch:
        code = watch(handle, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"flow_run_id": handle.flow_run_id, "flow_run_name": handle.flow_run_name, "dag": dag.name}))
    elif not args.watch:
        print(f"Follow it: cq watch {handle.flow_run_id}")
    return code


def cmd_dag_deploy(args) -> int:
    from cq_prefect.dag_submission import deploy_dag

    dag, content, folder = _dag_file(args.file)
    if args.parallel is not None and args.parallel < 1:
        raise SpecError(f"--parallel {args.parallel}: give at least 1 (nodes at once)")
    deploy_dag(dag, content, folder, name=args.name, pool=args.pool, cron=args.cron, timezone=args.timezone,
               max_parallel=args.parallel)
    print(f"Deployment '{dag.name}/{args.name}' on pool '{args.pool or 'local'}'"
          + (f", schedule '{args.cron}' ({args.timezone or 'UTC'})" if args.cron else ""))
    print(f"Run it: prefect deployment run '{dag.name}/{args.name}'")
    return 0


def cmd_mcp(args) -> int:
    from cq_prefect.errors import BadInput
    from cq_prefect.mcp_server import DEFAULT_PORT, serve

    http_only = [flag for flag, value in (("--host", args.host), ("--port", args.port),
                                          ("--token-block", args.token_block), ("--allowed-host", args.allowed_host))
                 if value is not None]
    if http_only and not args.http:  # stdio has no address, port or token: the flag would be silently ignored
        raise BadInput(f"{', '.join(http_only)} {'applies' if len(http_only) == 1 else 'apply'} to the HTTP transport "
                       f"only; add --http (cq mcp --http {' '.join(http_only)} …), or leave "
                       f"{'it' if len(http_only) == 1 else 'them'} out for stdio")
    return serve(http=args.http, host=args.host or "127.0.0.1", port=DEFAULT_PORT if args.port is None else args.port,
                 token_block=args.token_block, allowed_hosts=args.allowed_host or ())


def cmd_demo(args) -> int:
    from cq_prefect.demo import run_demo

    return run_demo(quick=args.quick, target=args.target, budget=args.budget)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cq", description="Autonomous ML experimentation on Prefect + MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start the embedded stack (Prefect server, MLflow server, local worker)")
    p.add_argument("--prefect-port", type=int, help="Prefect server port (default 4200 or CQ_PREFECT_PORT)")
    p.add_argument("--mlflow-port", type=int, help="MLflow server port (default 5000 or CQ_MLFLOW_PORT)")
    p.add_argument("--pool", help="pool of the local worker (default 'local' or CQ_POOL)")
    p.add_argument("--no-worker", action="store_true", help="start the servers only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the embedded stack")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="URLs, health and workers of the stack")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("submit", help="run a shell command as an experiment on a pool")
    p.add_argument("--name", required=True, help="experiment name (MLflow run name)")
    p.add_argument("--workdir", required=True, help="folder the command runs in")
    p.add_argument("--command", required=True, help="shell command, e.g. 'python train.py --lr=0.1'")
    p.add_argument("--gpu-count", type=int, default=0, help="GPUs the command needs (default 0)")
    p.add_argument("--exp-id", help="stable id such as exp-044 (default: generated)")
    p.add_argument("--pool", help="work pool (default CQ_POOL or 'local')")
    p.add_argument("--env", action="append", metavar="K=V", help="environment variable for the command (repeatable)")
    p.add_argument("--tag", action="append", metavar="T", help="tag, 'key=value' or a label (repeatable)")
    p.add_argument("--param", action="append", metavar="K=V", help="MLflow param to record (repeatable)")
    p.add_argument("--timeout", type=float, help="kill the process tree after S seconds")
    p.add_argument("--watch", action="store_true", help="follow the run; the exit code is its outcome")
    p.add_argument("--json", action="store_true", help="print {flow_run_id, flow_run_name, exp_id, mlflow_run_id}")
    p.add_argument("--remote-workdir", action="store_true", help="the workdir exists only on the worker host")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("watch", help="live lines and metrics of a run until it ends (replays a finished one)")
    p.add_argument("run", metavar="RUN", help="flow-run id, flow-run name or exp id")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("metrics", help="a run's metrics from MLflow")
    p.add_argument("run", metavar="RUN", help="flow-run id, flow-run name or exp id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--history", action="store_true", help="include every [step, value] (with --json)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("worker", help="run a worker on this host")
    worker_sub = p.add_subparsers(dest="worker_command", required=True, metavar="ACTION")
    w = worker_sub.add_parser("start", help="poll a pool for experiment runs (outbound connections only)")
    w.add_argument("--pool", default="local", help="work pool to serve (created as type cq-gpu if missing)")
    w.add_argument("--name", help="worker name (default: cq-gpu-<host>-<pool>)")
    w.add_argument("--gpus", default="auto", help="devices to hand out: auto (nvidia-smi), a count N, or ids 0,1,3")
    w.add_argument("--limit", type=int, help="most runs at once, CPU runs included (default: no limit)")
    w.set_defaults(func=cmd_worker_start)

    p = sub.add_parser("dag", help="YAML DAG pipelines: validate, run, deploy")
    dag_sub = p.add_subparsers(dest="dag_command", required=True, metavar="ACTION")
    d = dag_sub.add_parser("validate", help="check a DAG file and print its execution plan (exit 2 on errors)")
    d.add_argument("file", metavar="FILE")
    d.set_defaults(func=cmd_dag_validate)
    d = dag_sub.add_parser("run", help="run a DAG file as a flow run on a pool")
    d.add_argument("file", metavar="FILE")
    d.add_argument("--watch", action="store_true", help="follow the DAG run; the exit code is its outcome")
    d.add_argument("--resume", metavar="RUN", help="a previous run of this DAG: re-run only what did not succeed")
    d.add_argument("--pool", help="pool of the DAG run and default pool of its GPU nodes (default CQ_POOL or 'local')")
    d.add_argument("--parallel", type=int, help="most nodes at once (default 8)")
    d.add_argument("--json", action="store_true", help="print {flow_run_id, flow_run_name, dag}")
    d.set_defaults(func=cmd_dag_run)
    d = dag_sub.add_parser("deploy", help="make a DAG a deployment (prefect deployment run '<dag>/<name>')")
    d.add_argument("file", metavar="FILE")
    d.add_argument("--name", default="default", help="deployment name (default 'default')")
    d.add_argument("--pool", help="work pool (default CQ_POOL or 'local')")
    d.add_argument("--cron", help="schedule, e.g. '0 2 * * *' for 02:00 every night")
    d.add_argument("--timezone", help="time zone of --cron (default UTC), e.g. Europe/Berlin")
    d.add_argument("--parallel", type=int, help="most nodes at once (default 8)")
    d.set_defaults(func=cmd_dag_deploy)

    from cq_prefect.loop_cli import add_parser as add_loop_parser

    add_loop_parser(sub)  # cq loop start | status | resume | stop (cq_prefect.loop_cli)

    from cq_prefect.knowledge_cli import add_parser as add_knowledge_parser

    add_knowledge_parser(sub)  # cq note | cq knowledge search | cq pi (cq_prefect.knowledge_cli)

    p = sub.add_parser("mcp", help="serve cq's tools to AI assistants (Model Context Protocol): stdio, or --http")
    p.add_argument("--http", action="store_true",
                   help="streamable HTTP at http://HOST:PORT/mcp instead of stdio; clients must send a bearer token "
                        "(CQ_MCP_TOKEN or --token-block)")
    p.add_argument("--host", help="address to listen on with --http (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on with --http (default 8765)")
    p.add_argument("--token-block", metavar="NAME", help="with --http: a Prefect Secret block holding the bearer token")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="with --http: also accept this Host header (NAME, NAME:PORT or NAME:*), e.g. the public name "
                        "a reverse proxy passes on; repeatable (default: 127.0.0.1, localhost, [::1] on a loopback "
                        "bind, anything on another)")
    p.set_defaults(func=cmd_mcp)

    p = sub.add_parser("demo", help="the seed scenario: a research loop takes a 3D pose model below 25 mm MPJPE")
    p.add_argument("--quick", action="store_true", help="small data and 5 epochs: the whole chain in about a minute")
    p.add_argument("--target", type=float, help="the MPJPE goal in mm (default 25)")
    p.add_argument("--budget", type=int, help="the most experiments, baseline included (default 5; 3 with --quick)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from cq_prefect.auth import apply_client_environment

        apply_client_environment()  # CQ_PREFECT_AUTH / CQ_MLFLOW_AUTH → the clients' variables, before Prefect loads
        return int(args.func(args) or 0)
    except CqError as exc:
        print(f"cq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        from cq_prefect.auth import refusal

        refused = refusal(exc)  # a 401 from inside Prefect's or MLflow's client: name the variable to set
        if refused is None:
            raise
        print(f"cq: error: {refused}", file=sys.stderr)
        return refused.exit_code
    except KeyboardInterrupt:
        print("cq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
