"""``cq loop start | status | resume | stop``: the research loop from the command line.

Exit codes: 0 the loop ended (goal reached, budget or ideas used up, time budget, stopped); 1 it ended with
too_many_failures, or its parent failed or died; 2 bad input — a bad config, or a base experiment that never
prints the metric ("metric 'mpjpe' was never printed — does the script print @mpjpe=…?").
"""

from __future__ import annotations

import json
import sys
from typing import Any

from cq_prefect.errors import BadInput, LoopConfigError

CLAUDE_FLAGS = ("model", "effort", "credentials")  # for --proposer claude only
BAD_INPUT_KINDS = {"MetricNeverPrinted", "LoopConfigError", "OverrideError", "BadInput", "SpecError", "UnknownRun"}


def _config_from_args(args) -> Any:
    from cq_prefect.loop_config import LoopConfig

    overrides = {k: getattr(args, k) for k in ("budget", "parallel", "name") if getattr(args, k) is not None}
    if args.file:
        flags = [f for f in ("goal", "metric", "direction", "target", "workdir", "command", "ideas", "space",
                             *CLAUDE_FLAGS) if getattr(args, f, None) is not None]
        if flags:
            raise LoopConfigError(f"give either a loop YAML file or --{flags[0]} and the other flags, not both "
                                  f"(only --budget, --parallel, --name, --editable, --merge and --prune-branches "
                                  f"change a file's values)")
        config = LoopConfig.from_yaml(args.file)
        code = _code_flags(args, config.code.model_dump() if config.code else None)
        if code is not None:
            overrides["code"] = code
        return config.model_validate({**config.model_dump(mode="json"), **overrides}) if overrides else config
    missing = [f"--{f}" for f in ("metric", "budget", "workdir", "command") if getattr(args, f) is None]
    if missing:
        raise LoopConfigError(f"cq loop start needs {', '.join(missing)} (or a loop YAML file: cq loop start FILE.yaml)")
    kind = args.proposer or ("optuna" if args.space else "scripted")
    proposer: dict[str, Any] = {"kind": kind}
    claude_flags = [f for f in CLAUDE_FLAGS if getattr(args, f, None) is not None]
    if claude_flags and kind != "claude":
        raise LoopConfigError(f"--{claude_flags[0]} is for --proposer claude; leave it out with --proposer {kind}")
    if kind == "scripted":
        if not args.ideas:
            raise LoopConfigError("--proposer scripted needs --ideas FILE (a list of {title, rationale, overrides})")
        proposer["ideas"] = args.ideas
    elif kind == "optuna":
        if not args.space:
            raise LoopConfigError("--proposer optuna needs --space FILE (a search space: name: {type, low, high})")
        proposer["space"] = args.space
    else:  # claude: the space bounds its parameters (and Optuna over it is the fallback); ideas are the fallback
        if args.space:
            proposer["space"] = args.space
        if args.ideas:
            proposer["fallback"] = {"kind": "scripted", "ideas": args.ideas}
        proposer.update({f: getattr(args, f) for f in claude_flags})
    data: dict[str, Any] = {
        "name": args.name or f"{args.metric.replace('/', '-')}-loop",
        "goal": args.goal or "", "metric": args.metric, "budget": args.budget, "proposer": proposer,
        "experiment": {"workdir": args.workdir, "command": args.command, "gpu_count": args.gpu_count,
                       **({"pool": args.pool} if args.pool else {})},
    }
    for key in ("direction", "target", "parallel", "max_failures", "time_budget", "metric_strategy"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    if args.pruning:
        data["pruning"] = {"rule": args.pruning}
    code = _code_flags(args, None)
    if code is not None:
        data["code"] = code
    return LoopConfig.parse(data, source="cq loop start")


def _code_flags(args, code: dict[str, Any] | None) -> dict[str, Any] | None:
    """The code section with --editable, --merge and --prune-branches applied (None when there is none)."""
    if getattr(args, "editable", None):
        code = {**(code or {}), "editable": list(args.editable)}
    for flag, key in (("merge", "merge"), ("prune_branches", "prune_branches")):
        if getattr(args, flag, False):
            if code is None:
                raise LoopConfigError(f"--{flag.replace('_', '-')} works on code branches: give --editable GLOB (the "
                                      f"files hypotheses may edit) or code: {{editable: [...]}} in the loop YAML")
            code = {**code, key: True}
    return code


def _finish(run, endpoints, args) -> int:
    from cq_prefect import tracking
    from cq_prefect.ledger import Ledger, status_json
    from cq_prefect.loop_submission import follow

    if args.detach:
        print(json.dumps({"name": run.name, "flow_run_id": run.flow_run_id, "flow_run_name": run.flow_run_name})
              if args.json else
              f"Loop {run.name}: flow run {run.flow_run_name} ({run.flow_run_id})"
              + (f", running here (log {run.log_path})" if run.pid else ", left to the pool's worker")
              + f"\nFollow it: cq loop status {run.name}")
        return 0
    print(f"Loop {run.name}: flow run {run.flow_run_name} ({run.flow_run_id})", file=sys.stderr)
    try:
        state = follow(run, endpoints, out=sys.stderr if args.json else sys.stdout)
    except KeyboardInterrupt:
        print(f"cq: stopped following; the loop goes on (`cq loop status {run.name}`, `cq loop stop {run.name}`)",
              file=sys.stderr)
        return 130
    ledger = Ledger.latest(tracking.client(endpoints.mlflow_tracking_uri), run.name)
    status = status_json(ledger) if ledger else {"name": run.name, "status": "failed", "reason": None}
    if args.json:
        print(json.dumps(status))
    tags = ledger.tags() if ledger else {}
    if state == "LOST":
        print(f"cq: the loop's process died; continue it with `cq loop resume {run.name}`", file=sys.stderr)
        return 1
    if state != "COMPLETED":
        error = tags.get("cq.loop.error") or f"the loop's flow run ended {state}"
        print(f"cq: error: {error}", file=sys.stderr)
        return 2 if tags.get("cq.loop.error_kind") in BAD_INPUT_KINDS else 1
    return 1 if status.get("reason") == "too_many_failures" else 0


def cmd_loop_start(args) -> int:
    from cq_prefect.loop_submission import check_can_start, start_loop
    from cq_prefect.stack import connect

    config = _config_from_args(args)  # bad input: exit 2 before anything is created
    endpoints = connect()
    check_can_start(config, endpoints)
    run = start_loop(config, endpoints=endpoints)
    return _finish(run, endpoints, args)


def cmd_loop_resume(args) -> int:
    from cq_prefect.loop_submission import resume_loop
    from cq_prefect.stack import connect

    if args.budget is not None and args.budget < 1:
        raise LoopConfigError(f"--budget {args.budget} must be at least 1 (the most experiments to run, in all)")
    endpoints = connect()
    run = resume_loop(args.loop, budget=args.budget, endpoints=endpoints)
    return _finish(run, endpoints, args)


def cmd_loop_status(args) -> int:
    from cq_prefect import tracking
    from cq_prefect.ledger import TAG_BEST, TAG_LOOP, TAG_REASON, TAG_STATUS, Ledger, status_json
    from cq_prefect.stack import connect

    endpoints = connect()
    mlflow = tracking.client(endpoints.mlflow_tracking_uri)
    if not args.loop:
        loops = [{"name": r.data.tags.get(TAG_LOOP), "status": r.data.tags.get(TAG_STATUS),
                  "reason": r.data.tags.get(TAG_REASON) or None,
                  "best": float(r.data.tags[TAG_BEST]) if r.data.tags.get(TAG_BEST) else None}
                 for r in Ledger.all(mlflow)]
        if args.json:
            print(json.dumps(tracking.json_safe(loops)))
        elif not loops:
            print("no loops yet; start one with `cq loop start`")
        for loop in loops if not args.json else []:
            print(f"{loop['name']:30} {loop['status'] or '?':9} {loop['reason'] or '':18} best {loop['best']}")
        return 0
    ledger = Ledger.require(mlflow, args.loop)
    status = status_json(ledger)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"Loop {status['name']}: {status['status']}" + (f" ({status['reason']})" if status["reason"] else ""))
    print(f"  best {status['best']} ({status['best_exp_id'] or '–'}), target {status['target']}")
    if status.get("best_branch"):
        print(f"  best code: branch {status['best_branch']}"
              + (f" (merged: {status['merged'][:12]})" if status.get("merged") else ""))
    print(f"  cycles {status['cycles']}, budget {status['budget']} ({status['budget_left']} left), "
          f"running: {', '.join(status['running']) or 'none'}")
    if status.get("error"):
        print(f"  error: {status['error']}")
    if status.get("reason_detail"):
        print(f"  why: {status['reason_detail']}")
    print(f"  {'experiment':32} {'cycle':>5} {'outcome':10} {'value':>10}  hypothesis")
    for e in status["experiments"]:
        value = "–" if e["value"] is None else f"{e['value']:.4g}" if isinstance(e["value"], float) else e["value"]
        print(f"  {e['exp_id']:32} {e['cycle']:5d} {e['outcome']:10} {value:>10}  {e['hypothesis']}")
    return 0


def cmd_loop_stop(args) -> int:
    from cq_prefect.loop_submission import stop_loop

    status = stop_loop(args.loop, wait=args.wait)
    if args.json:
        print(json.dumps(status))
    else:
        print(f"Loop {status['name']}: {status['status']} ({status['reason'] or '–'}); "
              f"{len(status['experiments'])} experiments recorded")
    return 0


def add_parser(sub) -> None:
    """Register ``cq loop …`` on the ``cq`` parser's subcommands."""
    p = sub.add_parser("loop", help="research loops: start, status, resume, stop")
    loop_sub = p.add_subparsers(dest="loop_command", required=True, metavar="ACTION")

    s = loop_sub.add_parser("start", help="start a research loop (flags, or a loop YAML file)")
    s.add_argument("file", nargs="?", metavar="FILE.yaml", help="a loop YAML file (see deployments/loops/)")
    s.add_argument("--goal", help="the goal in words, e.g. 'improve MPJPE below 18mm' (the target is read from it)")
    s.add_argument("--metric", help="the metric the script prints as @KEY=VALUE")
    s.add_argument("--direction", help="minimize or maximize (read from the goal when not given)")
    s.add_argument("--target", help="the target value, e.g. 18 or 18mm (read from the goal when not given)")
    s.add_argument("--budget", type=int, help="most experiments to run, the baseline included")
    s.add_argument("--parallel", type=int, help="experiments at once (default 1)")
    s.add_argument("--max-failures", type=int, help="stop after this many crashed or metric-less experiments (3)")
    s.add_argument("--time-budget", help="stop starting experiments after this long, e.g. 8h")
    s.add_argument("--metric-strategy", choices=["last", "min", "max"], help="which value counts (default last)")
    s.add_argument("--proposer", choices=["scripted", "optuna", "claude"], help="where hypotheses come from")
    s.add_argument("--ideas", help="ideas YAML for the scripted proposer")
    s.add_argument("--space", help="search-space YAML for the optuna proposer")
    s.add_argument("--pruning", choices=["none", "median", "asha"], help="early stopping of bad runs (default none)")
    s.add_argument("--editable", action="append", metavar="GLOB",
                   help="files hypotheses may edit, relative to the workdir (repeatable; needs a git workdir): each "
                        "experiment runs on its own branch cq/<loop>/<exp-id>")
    s.add_argument("--merge", action="store_true", help="at the end, merge cq/<loop>/best into the starting branch")
    s.add_argument("--prune-branches", action="store_true",
                   help="at the end, delete the branches of experiments that were not kept")
    s.add_argument("--model", help="Claude model for --proposer claude (default: a current model)")
    s.add_argument("--effort", choices=["low", "medium", "high", "xhigh", "max"],
                   help="how much effort Claude spends per answer (default high)")
    s.add_argument("--credentials", metavar="BLOCK",
                   help="AnthropicCredentials block holding the API key (default: ANTHROPIC_API_KEY, else the block "
                        "'anthropic')")
    s.add_argument("--workdir", help="folder the command runs in")
    s.add_argument("--command", help="the base experiment's shell command")
    s.add_argument("--gpu-count", type=int, default=0, help="GPUs per experiment (default 0)")
    s.add_argument("--pool", help="pool the experiments run on (default CQ_POOL or 'local')")
    s.add_argument("--name", help="loop name (default: <metric>-loop)")
    s.add_argument("--detach", action="store_true", help="return once the loop has started")
    s.add_argument("--json", action="store_true", help="print the final status (cq loop status --json) at the end")
    s.set_defaults(func=cmd_loop_start)

    s = loop_sub.add_parser("status", help="a loop's cycles, best, budget left and running experiments")
    s.add_argument("loop", nargs="?", metavar="LOOP", help="loop name (default: list every loop)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_loop_status)

    s = loop_sub.add_parser("resume", help="continue a loop whose parent died (or raise its budget)")
    s.add_argument("loop", metavar="LOOP")
    s.add_argument("--budget", type=int, help="a new budget: most experiments in all")
    s.add_argument("--detach", action="store_true", help="return once the loop has started")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_loop_resume)

    s = loop_sub.add_parser("stop", help="stop a loop: its experiments are cancelled, reason 'stopped'")
    s.add_argument("loop", metavar="LOOP")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the loop to stop (default 60)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_loop_stop)


__all__ = ["add_parser", "BadInput"]
