"""``cq demo``: the seed scenario on the embedded stack — a 3D pose model from ~46 mm MPJPE to below 25 mm.

    $ cq demo            # ≤ 6 minutes on 2 CPU cores: baseline exp-042, then the research loop
    $ cq demo --quick    # ≤ 90 s: the same chain on small data (numbers far from the goal)

The stack is started if needed. The demo reads what earlier pose loops on this stack learned, then runs
the research loop of ``examples/pose/loop.yaml`` as a flow run of ``research-loop/default``: the baseline
(``exp-042`` on a fresh stack; later demos go on numbering), then the ideas of ``examples/pose/ideas.yaml``
(the seed's directions), then Optuna over ``examples/pose/space.yaml`` once the ideas are used up — until
MPJPE < 25 mm or 5 experiments. It follows the loop live and ends with the seed's Results table, the
reduction in percent, the compute time, and links to the loop in the Prefect UI and the MLflow UI.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cq_prefect.errors import BadInput

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
POSE = EXAMPLES / "pose"
LOOP_FILE = POSE / "loop.yaml"
FIRST_EXP = 42  # the seed's baseline is exp-042
QUICK_BUDGET = 3


@dataclass
class Row:
    """One line of the Results table."""

    exp_id: str
    change: str
    value: float | None
    outcome: str
    seconds: float | None


def demo_config(*, quick: bool = False, target: float | None = None, budget: int | None = None,
                first_n: int = FIRST_EXP):
    """The demo's loop config: ``examples/pose/loop.yaml`` with the demo's options applied."""
    from cq_prefect.loop_config import LoopConfig

    if not LOOP_FILE.exists():
        raise BadInput(f"the demo needs {LOOP_FILE}; run cq demo from a checkout installed with `pip install -e .`")
    if importlib.util.find_spec("torch") is None:
        raise BadInput("the demo trains a torch model, and torch is not installed here: pip install -e '.[pose]' "
                       "(on a CPU-only machine first: pip install torch --index-url https://download.pytorch.org/whl/cpu)")
    config = LoopConfig.from_yaml(LOOP_FILE)
    data = config.model_dump(mode="json", exclude={"direction", "unit"} if target is not None else set())
    data["first_n"] = first_n
    if quick:
        data["name"] = f"{config.name}-quick"
        data["experiment"]["command"] += " --quick"
        data["budget"] = QUICK_BUDGET
    if budget is not None:
        data["budget"] = budget
    if target is not None:
        data.update(goal=f"improve MPJPE below {target:g}mm", target=target)
    return LoopConfig.parse(data, source="cq demo")


def run_demo(quick: bool = False, target: float | None = None, budget: int | None = None,
             out: TextIO = sys.stdout) -> int:
    from rich.console import Console

    from cq_prefect import tracking
    from cq_prefect.ledger import Ledger
    from cq_prefect.loop_submission import check_can_start, follow, start_loop
    from cq_prefect.stack import connect

    console = Console(file=out, highlight=False, soft_wrap=True)
    config = demo_config(quick=quick, target=target, budget=budget)
    endpoints = connect()
    mlflow = tracking.client(endpoints.mlflow_tracking_uri)
    known = _knowledge(mlflow, config.name)
    config = config.model_copy(update={"first_n": FIRST_EXP + len(known)})  # later demos go on numbering
    check_can_start(config, endpoints)

    console.print("Loading related knowledge…")
    _print_knowledge(console, config, known)
    console.print(f"\n[bold]Goal:[/bold] {config.goal} — at most {config.budget} experiments "
                  f"({'quick mode: small data, 5 epochs' if quick else 'about 15-40 s of training each'})")
    run = start_loop(config, endpoints=endpoints)
    watcher = _Watcher(mlflow, config)
    with console.status("starting the loop…") as status:
        watcher.start(status)
        try:
            state = follow(run, endpoints, out=_ConsoleOut(console), poll_interval=1.0)
        finally:
            watcher.stop()
    ledger = Ledger.latest(mlflow, config.name)
    if ledger is None:
        console.print(f"[red]the loop {config.name} left no ledger (state {state}); see `cq loop status`[/red]")
        return 1
    rows = _rows(mlflow, ledger)
    _print_report(console, config, ledger, rows, endpoints, run.flow_run_id)
    tags = ledger.tags()
    return 0 if state == "COMPLETED" and tags.get("cq.loop.reason") != "too_many_failures" else 1


# -- knowledge: what earlier loops of this name learned ------------------------------------------------


def _knowledge(mlflow, name: str) -> list[dict[str, Any]]:
    """Every finished experiment of earlier loops named ``name``: exp id, hypothesis, change, outcome, value."""
    from cq_prefect import tracking
    from cq_prefect.ledger import TAG_CYCLE, TAG_HYPOTHESIS, TAG_LOOP, TAG_OUTCOME, TAG_VALUE

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        return []
    runs = mlflow.search_runs([experiment.experiment_id], max_results=5000,
                              filter_string=f"tags.`{TAG_LOOP}` = '{name}'")
    found = []
    for run in runs:
        tags = run.data.tags
        if TAG_CYCLE not in tags or tags.get(TAG_OUTCOME) == "running":
            continue  # the loop's parent run, or an experiment still running
        value = tags.get(TAG_VALUE)
        found.append({"exp_id": tags.get(tracking.TAG_EXP_ID) or run.info.run_name, "hypothesis": tags.get(TAG_HYPOTHESIS, ""),
                      "outcome": tags.get(TAG_OUTCOME, ""), "value": float(value) if value else None,
                      "delta": tags.get("cq.loop.delta")})
    return found


def _print_knowledge(console, config, known: list[dict[str, Any]]) -> None:
    if not known:
        console.print(f"  nothing yet: this is the first {config.name} loop on this stack "
                      f"(every result goes to the MLflow experiment '{config.name}')")
        return
    kept = [k for k in known if k["outcome"] == "kept" and k["delta"]]
    kept.sort(key=lambda k: -float(k["delta"]))
    best = [k for k in known if k["value"] is not None]
    best.sort(key=lambda k: k["value"] if config.direction == "minimize" else -k["value"])
    console.print(f"  {len(known)} earlier experiments of {config.name}")
    for k in kept[:3]:
        console.print(f"  {k['exp_id']}: {k['hypothesis']} improved {config.metric} by "
                      f"{config.format_value(float(k['delta']))}")
    if best:
        console.print(f"  best so far: {best[0]['exp_id']} ({best[0]['hypothesis']}) at "
                      f"{config.format_value(best[0]['value'])}")


# -- following the loop -------------------------------------------------------------------------------


class _ConsoleOut:
    """A text stream for :func:`follow` that prints through rich (above the live status line)."""

    def __init__(self, console):
        self.console = console

    def write(self, text: str) -> None:
        for line in text.splitlines():
            style = "bold" if line.startswith("[loop]") else ("green" if line.startswith("Result:") else None)
            self.console.print(line, style=style, markup=False)

    def flush(self) -> None:
        pass


class _Watcher:
    """Keeps the status line on the running experiment: its exp id and its latest streamed metric."""

    def __init__(self, mlflow, config):
        self.mlflow, self.config = mlflow, config
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, status) -> None:
        self._thread = threading.Thread(target=self._run, args=(status,), daemon=True, name="cq-demo-status")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self, status) -> None:
        from cq_prefect.ledger import Ledger, read_curve

        while not self._stop.wait(2.0):
            try:
                ledger = Ledger.latest(self.mlflow, self.config.name)
                records = ledger.records() if ledger else []
                running = [r for r in records if r.outcome == "running"]
                if not running:
                    status.update(f"{len(records)} experiments done · proposing…")
                    continue
                record = running[0]
                curve = read_curve(self.mlflow, record.mlflow_run_id, self.config.metric) if record.mlflow_run_id else ()
                latest = (f"epoch {curve[-1][0]}: @{self.config.metric}={self.config.format_value(curve[-1][1])}"
                          if curve else "starting")
                status.update(f"{record.exp_id} ({record.hypothesis.title}) · {latest}")
            except Exception:
                continue  # a status line is a courtesy; the loop's own log is the record


# -- the morning report ---------------------------------------------------------------------------------


def _rows(mlflow, ledger) -> list[Row]:
    from cq_prefect import tracking

    rows = []
    for record in ledger.records():
        seconds = None
        if record.mlflow_run_id:  # the command's own run time, as the experiment measured it
            duration = mlflow.get_run(record.mlflow_run_id).data.tags.get(tracking.TAG_DURATION)
            seconds = float(duration) if duration else None
        if record.cycle == 0:
            change = "Baseline"
        else:
            change = "+ " + record.hypothesis.title
            if record.outcome not in ("kept",):
                change += f" ({record.outcome})"
        rows.append(Row(record.exp_id, change, record.value, record.outcome, seconds))
    return rows


def results_table(rows: list[Row], config) -> str:
    """The seed's Results table, as markdown: Experiment | Change | MPJPE."""
    lines = ["| Experiment | Change | MPJPE |", "|---|---|---|"]
    lines += [f"| {r.exp_id} | {r.change} | {config.format_value(r.value)} |" for r in rows]
    return "\n".join(lines)


def _print_report(console, config, ledger, rows: list[Row], endpoints, flow_run_id: str) -> None:
    from rich.table import Table

    tags = ledger.tags()
    table = Table(title="Results", title_justify="left")
    for column in ("Experiment", "Change", "MPJPE", "Time"):
        table.add_column(column, justify="right" if column in ("MPJPE", "Time") else "left")
    for r in rows:
        style = "green" if r.outcome == "kept" else ("dim" if r.outcome == "discarded" else "yellow")
        table.add_row(r.exp_id, r.change, config.format_value(r.value),
                      f"{r.seconds:.0f} s" if r.seconds is not None else "–", style=style)
    console.print()
    console.print(table)
    baseline = rows[0].value if rows and rows[0].outcome in ("kept", "discarded") else None
    best = float(tags["cq.loop.best"]) if tags.get("cq.loop.best") else None
    if baseline and best is not None:
        reduction = (baseline - best) / baseline * 100 * (1 if config.direction == "minimize" else -1)
        console.print(f"[bold]{config.metric}: {config.format_value(baseline)} → {config.format_value(best)}: "
                      f"{'reduction' if config.direction == 'minimize' else 'gain'} {reduction:.1f}%[/bold]")
    compute = sum(r.seconds for r in rows if r.seconds is not None)
    reason = tags.get("cq.loop.reason") or tags.get("cq.loop.status")
    best_exp = tags.get("cq.loop.best_exp_id")
    console.print(f"{len(rows)} experiments, total compute {_duration(compute)}; the loop ended: {reason}"
                  + (f" (best: {best_exp})" if best_exp else ""))
    console.print(f"\nPrefect UI: {endpoints.prefect_ui_url}/runs/flow-run/{flow_run_id}")
    console.print(f"MLflow UI:  {endpoints.mlflow_ui_url}/#/experiments/{ledger.experiment_id}/runs/{ledger.run_id}")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"
