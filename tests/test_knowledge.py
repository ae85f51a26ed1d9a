"""Knowledge: experiments and notes in MLflow, the index under CQ_HOME, `cq note`, `cq knowledge search`, `cq pi`.

Records are written the way a research loop writes them (Ledger + LoopConfig + tracking.create_experiment_run
+ Ledger.record) into a real MLflow on a SQLite file; the CLI runs in-process (`cli.main`) against that file,
as a real `cq` process for bad input, and once end to end against the session stack's MLflow server (the
REST path `cq up` users take).
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest

from conftest import CQ, PYTHON, run_cq
from cq_prefect import cli, knowledge, knowledge_cli, ledger, tracking
from cq_prefect.directions import combinations, directions, farthest_point, unexplored
from cq_prefect.knowledge import Entry, rank, tokenize
from cq_prefect.knowledge_store import ClientRuns, KnowledgeIndex, RestRuns, write_note
from cq_prefect.ledger import Ledger
from cq_prefect.loop_config import LoopConfig
from cq_prefect.proposers.scripted import load_ideas
from cq_prefect.proposers.search_space import load_space
from cq_prefect.records import ExperimentRecord, Hypothesis
from cq_prefect.spec import ExperimentSpec

SPACE = """\
bone_loss_weight: {type: float, low: 0.0, high: 0.3, step: 0.05}
lr_schedule: [step, cosine, cosine_restarts]
width: {type: int, low: 256, high: 4096, log: true}
dropout: {type: float, low: 0.0, high: 0.5}
"""

# (title, rationale, change, outcome, value, message)
POSE = [
    ("bone-length loss", "predicted limbs drift in length between frames; penalise it", {"bone_loss_weight": 0.1},
     "kept", 19.87, None),
    ("wider layers", "more capacity for the lifter", {"width": 2048}, "discarded", 20.5, None),
    ("occlusion augmentation", "test detections miss joints the training data never misses", {"occlusion_aug": True},
     "crashed", None, "exited with code 1: CUDA out of memory"),
    ("cosine schedule", "decay the rate gently at the end", {"lr_schedule": "cosine"}, "kept", 19.2, None),
]
HANDS = [
    ("mixup between hands", "blend two hands and their keypoints", {"mixup": 0.2}, "kept", 83.0, None),
    ("dropout in the head", "the head overfits the training hands", {"dropout": 0.1}, "discarded", 79.0, None),
    ("cosine schedule", "decay the rate gently at the end", {"lr_schedule": "cosine"}, "discarded", 82.5, None),
]


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder.absolute() / 'mlflow.db'}"  # sqlite:////abs/path: an absolute file


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def record_loop(mlflow, workdir: Path, name: str, goal: str, metric: str, baseline: float, experiments: list,
                direction: str | None = None, edits: dict[int, tuple] | None = None,
                command: str = "python train.py", proposer: dict | None = None) -> Ledger:
    """A loop's ledger as `research_loop` leaves it: the parent run, then per experiment its MLflow run created
    with the ledger's child tags and the outcome recorded with its delta against the best before it. ``edits``:
    per cycle, the code edits of its hypothesis (it then ran on branch cq/<loop>/<exp-id>)."""
    config = LoopConfig.parse({
        "name": name, "goal": goal, "metric": metric, "budget": len(experiments) + 1,
        **({"direction": direction} if direction else {}),
        "experiment": {"workdir": str(workdir), "command": command},
        "proposer": proposer or {"kind": "scripted", "ideas": [{"title": t, "rationale": r, "overrides": c}
                                                              for t, r, c, *_ in experiments]},
    })
    book = Ledger.create(mlflow, config, flow_run_id=str(uuid.uuid4()), flow_run_name=f"{name}-parent")
    history: list[ExperimentRecord] = []
    best = None
    rows = [("baseline", "", {}, "kept", baseline, None), *experiments]
    for cycle, (title, rationale, change, outcome, value, message) in enumerate(rows):
        exp_id = config.exp_id(cycle, 0)
        spec = config.experiment.spec(name=exp_id, exp_id=exp_id, changes=[*config.kept_changes(history), change],
                                      tags=[f"{ledger.TAG_LEDGER}={book.run_id}"], mlflow_experiment=config.name)
        code = (edits or {}).get(cycle, ())
        pending = ExperimentRecord(
            exp_id=exp_id, cycle=cycle, hypothesis=Hypothesis(title=title, rationale=rationale, change=change,
                                                              edits=code),
            outcome="running", overrides=spec.params, **({"commit": "0" * 40, "branch": f"cq/{name}/{exp_id}"}
                                                         if code else {}))
        run_id = tracking.create_experiment_run(mlflow, spec, exp_id, extra_tags=book.child_tags(pending))
        if value is not None:
            mlflow.log_metric(run_id, metric, value, step=0)
        done = pending.model_copy(update={"outcome": outcome, "value": value, "message": message,
                                          "mlflow_run_id": run_id})
        delta = config.improvement(value, best) if outcome in ("kept", "discarded") and best is not None else None
        book.record(done, delta)
        history.append(done)
        if outcome == "kept":
            best = value
    book.finish("finished", "proposer_exhausted", None)
    return book


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow on a file keeps artifacts (the ledger's loop_config.json) in ./mlruns


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    """A knowledge base: two loops (pose MPJPE, hand PCK), a plain `cq submit` experiment, two notes."""
    folder = tmp_path_factory.mktemp("kb")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        return _knowledge_base(folder)


def _knowledge_base(folder: Path) -> dict:
    uri = sqlite_uri(folder)
    mlflow = mlflow_client(uri)
    work = folder / "project"
    work.mkdir()
    pose = record_loop(mlflow, work, "pose-mpjpe", "improve MPJPE below 18mm", "mpjpe", 21.43, POSE)
    hands = record_loop(mlflow, work, "hand-pck", "improve hand keypoint PCK above 90%", "pck", 80.0, HANDS,
                        direction="maximize")
    spec = ExperimentSpec(name="resnet baseline", workdir=str(work), command="python train.py --lr=0.1",
                          params={"lr": 0.1})
    plain = tracking.create_experiment_run(mlflow, spec, "exp-007")
    mlflow.log_metric(plain, "loss", 0.5)
    mlflow.set_tag(plain, tracking.TAG_OUTCOME, "success")
    mlflow.set_terminated(plain, "FINISHED")
    notes = [write_note(mlflow, "bone length loss needs a warm-up epoch before it helps", ["pose"]),
             write_note(mlflow, "mixup hurts on small datasets", ["hands", "augmentation"])]
    return {"uri": uri, "mlflow": mlflow, "folder": folder, "pose": pose, "hands": hands, "plain": plain,
            "notes": notes, "workdir": work}


@pytest.fixture
def index(kb, tmp_path) -> KnowledgeIndex:
    idx = KnowledgeIndex(tmp_path / "index.sqlite")
    idx.refresh(ClientRuns(kb["mlflow"]))
    yield idx
    idx.close()


@pytest.fixture
def cq_env(kb, tmp_path, monkeypatch):
    """The CLI, in this process, on the knowledge base's MLflow file and a fresh CQ_HOME."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", kb["uri"])
    monkeypatch.setenv("CQ_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cq(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- the pure core ------------------------------------------------------------------------------------


def test_tag_names_are_the_ledgers():
    assert (knowledge.TAG_KIND, knowledge.TAG_LOOP, knowledge.TAG_LEDGER, knowledge.TAG_CYCLE) == (
        ledger.TAG_KIND, ledger.TAG_LOOP, ledger.TAG_LEDGER, ledger.TAG_CYCLE)
    assert (knowledge.TAG_HYPOTHESIS, knowledge.TAG_RATIONALE, knowledge.TAG_CHANGE, knowledge.TAG_OVERRIDES) == (
        ledger.TAG_HYPOTHESIS, ledger.TAG_RATIONALE, ledger.TAG_CHANGE, ledger.TAG_OVERRIDES)
    assert (knowledge.TAG_OUTCOME, knowledge.TAG_VALUE, knowledge.TAG_DELTA, knowledge.TAG_MESSAGE) == (
        ledger.TAG_OUTCOME, ledger.TAG_VALUE, ledger.TAG_DELTA, ledger.TAG_MESSAGE)
    assert (knowledge.TAG_BRANCH, knowledge.TAG_EDITS) == (ledger.TAG_BRANCH, ledger.TAG_EDITS)
    assert (knowledge.TAG_EXP_ID, knowledge.TAG_RUN_OUTCOME, knowledge.UNIT_TAG_PREFIX) == (
        tracking.TAG_EXP_ID, tracking.TAG_OUTCOME, tracking.UNIT_TAG_PREFIX)


def test_tokenize_splits_identifiers_keeps_numbers_and_drops_plurals():
    assert tokenize("bone_loss_weight=0.05, Occlusions of the joints") == [
        "bone", "loss", "weight", "0.05", "occlusion", "joint"]


def entry(run_id: str, hypothesis: str, outcome: str = "discarded", delta: float | None = None, **fields) -> Entry:
    return Entry(kind="experiment", run_id=run_id, hypothesis=hypothesis, outcome=outcome, delta=delta, **fields)


def test_rank_favours_improvements_only_among_equally_relevant_entries():
    improved = entry("a", "mixup augmentation", outcome="kept", delta=0.8)
    discarded = entry("b", "mixup augmentation", outcome="discarded", delta=-0.3)
    crashed = entry("c", "mixup augmentation", outcome="crashed")
    unrelated = entry("d", "wider layers", outcome="kept", delta=2.0)
    hits = rank([crashed, discarded, unrelated, improved], "mixup augmentation")
    assert [h.entry.run_id for h in hits] == ["a", "b", "c"]  # same words: improved, then discarded, then crashed
    # A much better match is not overtaken by an improvement that shares one word with the query.
    exact = entry("e", "strong colour jitter augmentation", outcome="discarded", delta=-0.1)
    partial = entry("f", "strong weight decay", outcome="kept", delta=1.0)
    filler = [entry(f"x{i}", f"filler idea {i}") for i in range(6)]
    assert [h.entry.run_id for h in rank([partial, exact, *filler], "strong colour jitter augmentation")] == ["e", "f"]


def test_rank_is_deterministic_and_ties_go_to_the_newer_entry():
    older = Entry(kind="note", run_id="n1", text="cosine schedule helps", start_time=1_000)
    newer = Entry(kind="note", run_id="n2", text="cosine schedule helps", start_time=2_000)
    assert [h.entry.run_id for h in rank([older, newer], "cosine")] == ["n2", "n1"]
    assert [h.entry.run_id for h in rank([newer, older], "cosine")] == ["n2", "n1"]


def test_best_orders_near_ties_as_a_full_sort_of_the_rounded_scores():
    # best() rounds only the scores near its cut-off; the order must be that of rounding every score.
    import random

    rng = random.Random(3)
    for _ in range(200):
        base = rng.uniform(0.5, 20.0)
        scores = {doc: base + rng.choice([-2e-9, -1e-9, -6e-10, -4e-10, 0.0, 4e-10, 6e-10, 1e-9, rng.uniform(-1, 1)])
                  for doc in range(40)}
        starts = {doc: rng.randrange(5) for doc in scores}
        limit = rng.randrange(1, 12)
        full = sorted(scores, key=lambda doc: (-round(scores[doc], 9), -starts[doc], doc))[:limit]
        assert knowledge.best(scores, starts, limit) == full


# -- the index over real MLflow records ----------------------------------------------------------------


def ids(result) -> list[str]:
    return [h.entry.exp_id or h.entry.text for h in result.hits]


def test_index_holds_every_experiment_and_note_the_ledger_wrote(index):
    result = index.search("bone length loss", limit=20)
    assert result.total == 5 + 4 + 1 + 2  # two loops with their baselines, one plain experiment, two notes
    assert ids(result)[:2] == ["pose-mpjpe-c1-s0", "bone length loss needs a warm-up epoch before it helps"]
    top = result.hits[0].entry
    assert (top.loop, top.cycle, top.outcome, top.value, top.metric) == ("pose-mpjpe", 1, "kept", 19.87, "mpjpe")
    assert top.delta == pytest.approx(1.56) and top.improved and top.change == {"bone_loss_weight": 0.1}
    assert top.rationale.startswith("predicted limbs drift")


def test_code_edits_are_searched_by_path_and_new_text_and_shown_with_their_branch(tmp_path, capsys):
    from cq_prefect.records import Edit

    mlflow = mlflow_client(sqlite_uri(tmp_path))
    work = tmp_path / "project"
    work.mkdir()
    attention = Edit(path="nets/lifter.py", old="x = relu(x)",
                     new="x = x + self.joint_attention(self.norm(x))  # joints attend to each other")
    record_loop(mlflow, work, "pose-code", "improve MPJPE below 18mm", "mpjpe", 21.0, [
        ("attend across joints", "occluded joints need the visible ones", {}, "kept", 19.5, None),
        ("wider layers", "more capacity", {"width": 2048}, "discarded", 20.5, None),
    ], edits={1: (attention,)})
    idx = KnowledgeIndex(tmp_path / "index.sqlite")
    idx.refresh(ClientRuns(mlflow))
    for query in ("lifter.py", "joint_attention norm"):  # the edited path (change), the new text (code)
        top = idx.search(query, limit=2).hits[0].entry
        assert (top.exp_id, top.edited, top.branch) == ("pose-code-c1-s0", ("nets/lifter.py",),
                                                        "cq/pose-code/pose-code-c1-s0"), query
    assert "joint_attention" in top.code and top.improved
    assert "     edited nets/lifter.py · branch cq/pose-code/pose-code-c1-s0" in knowledge_cli.hit_text(
        idx.search("lifter", limit=1).hits[0], 1).splitlines()
    assert idx.search("relu", limit=5).matched == 0  # the old text is not the change: only the new one counts
    idx.close()


@pytest.mark.parametrize(("query", "expected"), [
    ("limbs drift", "pose-mpjpe-c1-s0"),            # rationale
    ("width", "pose-mpjpe-c2-s0"),                  # change key
    ("crashed out of memory", "pose-mpjpe-c3-s0"),  # outcome and its message
    ("resnet", "exp-007"),                          # a plain experiment, by its name
    ("small datasets", "mixup hurts on small datasets"),  # note text
    ("augmentation", "mixup hurts on small datasets"),     # note tag (and a hypothesis word, weighed less)
], ids=["rationale", "change", "outcome", "plain", "note", "note-tag"])
def test_search_finds_each_field(index, query, expected):
    assert ids(index.search(query, limit=3))[0] == expected


def test_search_puts_the_improvement_first_among_the_same_hypothesis(index):
    hits = index.search("cosine schedule", limit=2).hits
    assert [(h.entry.loop, h.entry.outcome) for h in hits] == [("pose-mpjpe", "kept"), ("hand-pck", "discarded")]
    assert hits[0].entry.improved and not hits[1].entry.improved


def test_index_ranks_as_the_pure_core_does(index, kb):
    from cq_prefect.knowledge import entry_from_run, loop_from_run

    source = ClientRuns(kb["mlflow"])
    runs = [r for e in source.experiments() for r in source.runs([e.id])]
    loops = {r["run_id"]: loop_from_run(r) for r in runs if loop_from_run(r)}
    entries = [e for e in (entry_from_run(r, loops) for r in runs) if e is not None]
    for query in ("pose cosine schedule", "mixup", "loss weight 0.1"):
        expected = rank(entries, query, limit=8)
        got = index.search(query, limit=8).hits
        assert [h.entry.run_id for h in got] == [h.entry.run_id for h in expected]
        assert [h.score for h in got] == pytest.approx([h.score for h in expected])


class RecordingSource:
    """The MLflow client source, noting what each refresh asks for."""

    def __init__(self, mlflow):
        self.inner = ClientRuns(mlflow)
        self.asked: list[tuple[int, str]] = []

    def experiments(self, updated_since=None):
        self.asked.append((-1, "experiments" if updated_since is None else f"experiments >= {updated_since}"))
        return self.inner.experiments(updated_since)

    def runs(self, experiment_ids, filter_string=""):
        self.asked.append((len(experiment_ids), filter_string))
        return self.inner.runs(experiment_ids, filter_string)


def test_index_refreshes_incrementally(kb, tmp_path, monkeypatch):
    import cq_prefect.knowledge_store as store

    monkeypatch.setattr(store, "MARGIN_MS", 0)  # re-read nothing for clock skew: what is read is what changed
    mlflow = kb["mlflow"]
    source = RecordingSource(mlflow)
    with KnowledgeIndex(tmp_path / "index.sqlite") as idx:
        first = idx.refresh(source)
        assert first.full and first.indexed >= 12 and [f for _, f in source.asked] == ["experiments", ""]
        source.asked.clear()
        again = idx.refresh(source)
        assert not again.full and again.read <= 2  # only the newest run(s), at the watermark
        # Only experiments changed since the newest change seen, and runs started since the newest run seen.
        assert [f.split(">=")[0] for _, f in source.asked] == ["experiments ", "attributes.start_time "]
        # A new loop whose experiment is still running: indexed as running, then read again by id (it is older
        # than the watermark by then) until the ledger records its outcome.
        config = LoopConfig.parse({"name": "refresh-loop", "metric": "mpjpe", "target": 1, "direction": "minimize",
                                   "budget": 2,
                                   "experiment": {"workdir": str(kb["workdir"]), "command": "python train.py"},
                                   "proposer": {"kind": "scripted", "ideas": [{"title": "quaternion output"}]}})
        book = Ledger.create(mlflow, config, flow_run_id=str(uuid.uuid4()), flow_run_name="refresh")
        try:
            spec = config.experiment.spec(name="rl-1", exp_id="rl-1", mlflow_experiment=config.name)
            pending = ExperimentRecord(exp_id="rl-1", cycle=1, hypothesis=Hypothesis(title="quaternion output"),
                                       outcome="running")
            run_id = tracking.create_experiment_run(mlflow, spec, "rl-1", extra_tags=book.child_tags(pending))
            idx.refresh(source)
            assert [(h.entry.exp_id, h.entry.outcome) for h in idx.search("quaternion").hits] == [("rl-1", "running")]
            later = write_note(mlflow, "a later note moves the watermark past rl-1")
            idx.refresh(source)
            book.record(pending.model_copy(update={"outcome": "kept", "value": 17.0, "mlflow_run_id": run_id}), 0.5)
            source.asked.clear()
            idx.refresh(source)
            assert f"attributes.run_id IN ('{run_id}')" in [f for _, f in source.asked]
            hit = idx.search("quaternion").hits[0].entry
            assert (hit.outcome, hit.value, hit.delta, hit.improved) == ("kept", 17.0, 0.5, True)
            assert hit.metric == "mpjpe"  # from its loop, indexed by an earlier refresh
            mlflow.delete_run(later)
            # A deleted experiment takes its entries with it.
            mlflow.delete_experiment(book.experiment_id)
            report = idx.refresh(source)
            assert report.removed == 1 and idx.search("quaternion").hits == []
        finally:
            if mlflow.get_experiment(book.experiment_id).lifecycle_stage == "active":
                mlflow.delete_experiment(book.experiment_id)  # leave the module's knowledge base as it was


def test_a_damaged_index_file_is_rebuilt_from_mlflow(kb, tmp_path):
    path = tmp_path / "index.sqlite"
    path.write_bytes(b"not a database" * 100)
    with KnowledgeIndex(path) as idx:
        assert idx.empty()
        idx.refresh(ClientRuns(kb["mlflow"]))
        assert ids(idx.search("mixup"))[0] == "hand-pck-c1-s0"


def test_an_index_of_an_older_schema_is_rebuilt_from_mlflow(kb, tmp_path):
    import sqlite3

    import cq_prefect.knowledge_store as store

    path = tmp_path / "index.sqlite"
    with KnowledgeIndex(path) as idx:
        idx.refresh(ClientRuns(kb["mlflow"]))
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(int(store.SCHEMA_VERSION) - 1),))
        db.execute("DROP INDEX entries_length")  # what an index of the older schema lacks
    db.close()
    with KnowledgeIndex(path) as idx:
        assert idx.empty() and idx.count() == 0
        idx.refresh(ClientRuns(kb["mlflow"]))
        assert ids(idx.search("mixup"))[0] == "hand-pck-c1-s0"
        assert idx.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries_length'").fetchone()


def test_rest_source_reads_mlflow_json_as_the_client_does():
    # MLflow's REST shape (runs/search), through the injectable transport.
    import io

    pages = {"experiments/search": {"experiments": [{"experiment_id": "7", "name": "x", "lifecycle_stage": "active",
                                                     "last_update_time": "1700000000000"}]},
             "runs/search": {"runs": [{"info": {"run_id": "abc", "experiment_id": "7", "run_name": "n", "status":
                                                "FINISHED", "start_time": "1700000000000"},
                                       "data": {"tags": [{"key": "cq.kind", "value": "note"},
                                                         {"key": "cq.note.text", "value": "hi there"}],
                                                "metrics": [{"key": "m", "value": "NaN", "step": "0"}]}}]}}
    asked = []

    def opener(request, timeout):
        endpoint = request.full_url.rsplit("/mlflow/", 1)[1]
        asked.append((endpoint, json.loads(request.data)))
        return io.BytesIO(json.dumps(pages[endpoint]).encode())

    source = RestRuns("http://mlflow.example:5000/", opener=opener)
    assert [(e.id, e.active) for e in source.experiments()] == [("7", True)]
    runs = list(source.runs(["7"], "attributes.start_time >= 5"))
    assert runs[0]["tags"]["cq.note.text"] == "hi there" and runs[0]["start_time"] == 1700000000000
    assert math.isnan(runs[0]["metrics"]["m"])
    assert asked[1][1]["filter"] == "attributes.start_time >= 5" and asked[1][1]["run_view_type"] == "ACTIVE_ONLY"


# -- cq note and cq knowledge search ----------------------------------------------------------------


def test_note_round_trip(cq_env, kb, capsys):
    code, out, _ = cq(capsys, "note", "Heatmap regression beats direct regression for wrists", "--tag", "hands",
                      "--tag", "wrists", "--json")
    assert code == 0
    noted = json.loads(out)
    run = kb["mlflow"].get_run(noted["mlflow_run_id"])
    assert run.data.tags["cq.kind"] == "note" and run.info.status == "FINISHED"
    assert kb["mlflow"].get_experiment(run.info.experiment_id).name == "cq-knowledge"
    code, out, _ = cq(capsys, "knowledge", "search", "wrist heatmaps", "--json")
    assert code == 0
    found = json.loads(out)
    hit = found["hits"][0]
    assert (hit["kind"], hit["mlflow_run_id"], hit["tags"]) == ("note", noted["mlflow_run_id"], ["hands", "wrists"])
    assert hit["text"] == "Heatmap regression beats direct regression for wrists"
    kb["mlflow"].delete_run(noted["mlflow_run_id"])  # leave the module's knowledge base as it was


def test_search_prints_each_hit_with_its_outcome_value_and_delta(cq_env, capsys):
    code, out, err = cq(capsys, "knowledge", "search", "bone length loss", "--limit", "2")
    assert code == 0, err
    assert "indexing the experiments and notes" in err  # the first search of a CQ_HOME reads everything once
    assert out.splitlines()[0] == '2 of 12 records match "bone length loss":'
    assert "pose-mpjpe-c1-s0 · loop pose-mpjpe · cycle 1 · kept · mpjpe 19.87mm (Δ +1.56mm, improved)" in out
    assert "change: bone_loss_weight=0.1" in out
    assert "note " in out and "tags pose" in out
    assert (cq_env / "home" / "knowledge").is_dir()
    code, out, err = cq(capsys, "knowledge", "search", "wider", "--json")
    hit = json.loads(out)["hits"][0]
    assert (hit["exp_id"], hit["outcome"], hit["value"], hit["delta"], hit["change"]) == (
        "pose-mpjpe-c2-s0", "discarded", 20.5, pytest.approx(-0.63), {"width": 2048})
    assert "indexing" not in err  # the second search reads only what changed


# -- cq pi ----------------------------------------------------------------------------------------------


def test_pi_on_an_empty_knowledge_base_is_useful_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path))
    monkeypatch.setenv("CQ_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, out, err = cq(capsys, "pi", "improve 3D pose estimation accuracy, currently MPJPE 48mm, target <25mm")
    assert code == 0, err
    assert out.startswith("Loading related knowledge…")
    assert "nothing recorded yet" in out and "Claude is not configured" in out
    assert "--space space.yaml" in out and "No ideas file written" in out
    assert not (tmp_path / "pi-ideas.yaml").exists()
    # With a search space, the empty knowledge base still yields a spread of first points to try.
    (tmp_path / "space.yaml").write_text(SPACE)
    code, out, err = cq(capsys, "pi", "improve MPJPE", "--space", "space.yaml", "--out", "first.yaml")
    assert code == 0, err
    ideas = load_ideas(tmp_path / "first.yaml")
    assert {(k, v) for i in ideas for k, v in i.overrides.items()} == {
        ("bone_loss_weight", 0.15), ("lr_schedule", "step"), ("lr_schedule", "cosine"),
        ("lr_schedule", "cosine_restarts"), ("width", 1024), ("dropout", 0.25)}


def test_pi_without_space_explores_the_space_the_related_loop_declared(tmp_path, monkeypatch, capsys):
    uri = sqlite_uri(tmp_path)
    work = tmp_path / "project"
    work.mkdir()
    space = {"depth": {"type": "int", "low": 2, "high": 8}, "act": ["relu", "gelu", "silu"]}
    record_loop(mlflow_client(uri), work, "lifter", "improve MPJPE below 18mm", "mpjpe", 30.0, [
        ("deeper lifter", "more layers", {"depth": 4}, "kept", 28.0, None)],
        proposer={"kind": "optuna", "space": space})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CQ_HOME", str(tmp_path / "home"))
    code, out, err = cq(capsys, "pi", "a deeper lifter for MPJPE", "--no-claude", "--out", str(tmp_path / "i.yaml"))
    assert code == 0, err
    assert "  search space: loop lifter's (depth, act); --space FILE gives another" in out
    ideas = load_ideas(tmp_path / "i.yaml")
    explored = [next(iter(i.overrides.items())) for i in ideas if len(i.overrides) == 1]
    assert explored and all(v in space["act"] if k == "act" else 2 <= v <= 8 and v != 4 for k, v in explored)


def test_pi_writes_ideas_from_past_improvements_and_the_unexplored_space(cq_env, kb, capsys):
    (cq_env / "space.yaml").write_text(SPACE + "mixup: {type: float, low: 0.0, high: 0.4}\n")  # hand-pck's knob
    code, out, err = cq(capsys, "pi", "improve 3D pose accuracy with bone length loss, mixup and a cosine schedule",
                        "--space", "space.yaml", "--out", "ideas.yaml")
    assert code == 0, err
    assert out.startswith("Loading related knowledge…") and "Claude is not configured" in out
    assert "pose-mpjpe-c1-s0" in out and "kept" in out
    path = cq_env / "ideas.yaml"
    ideas = load_ideas(path)  # what `cq loop start --proposer scripted --ideas FILE` reads
    assert 2 <= len(ideas) <= 8
    improvements = {("bone_loss_weight", 0.1), ("lr_schedule", "cosine"), ("mixup", 0.2)}
    tried = [json.loads(r.data.tags["cq.loop.overrides"]) for r in kb["mlflow"].search_runs(
        [kb["pose"].experiment_id, kb["hands"].experiment_id]) if "cq.loop.overrides" in r.data.tags]
    space = load_space(cq_env / "space.yaml")
    kinds = {"combine": 0, "explore": 0}
    for idea in ideas:
        items = set(idea.overrides.items())
        if items <= improvements:  # a union of real past improvements, never run together
            kinds["combine"] += 1
            assert len(items) >= 2
            assert not any(items <= set(o.items()) for o in tried)
        else:  # one point of the declared space that no experiment tried
            kinds["explore"] += 1
            [(name, value)] = items
            param = space[name]
            assert value in param.choices if hasattr(param, "choices") else param.low <= value <= param.high
            assert all(o.get(name) != value for o in tried)
    assert kinds["combine"] >= 2 and kinds["explore"] >= 2, out
    # The loop takes the file as it is.
    config = LoopConfig.parse({"name": "from-pi", "metric": "mpjpe", "goal": "MPJPE below 25mm",
                               "budget": len(ideas) + 1,
                               "experiment": {"workdir": str(kb["workdir"]), "command": "python train.py"},
                               "proposer": {"kind": "scripted", "ideas": str(path)}})
    assert [i.title for i in config.proposer.ideas] == [i.title for i in ideas]
    assert "cq loop start --proposer scripted --ideas" in out and "--metric mpjpe" in out


def test_pi_json_lists_hits_and_ideas(cq_env, capsys):
    code, out, _ = cq(capsys, "pi", "mixup and bone length loss for hand and body keypoints", "--json",
                      "--out", "j.yaml")
    assert code == 0
    report = json.loads(out)
    assert {"pose-mpjpe-c1-s0", "hand-pck-c1-s0"} <= {h["exp_id"] for h in report["hits"]}
    assert report["brainstorm"] is None and report["out"] == str(cq_env / "j.yaml")
    assert [i["title"] for i in report["ideas"]] == [i.title for i in load_ideas(cq_env / "j.yaml")]
    assert report["ideas"][0]["overrides"] == {"bone_loss_weight": 0.1, "mixup": 0.2}
    assert report["ideas"][0]["sources"] == ["pose-mpjpe-c1-s0", "hand-pck-c1-s0"]


def test_directions_prefer_a_brainstorm_when_one_is_configured():
    from cq_prefect.directions import Suggestion

    class Fixed:
        name = "fixed"

        def __call__(self, goal, hits):
            return [Suggestion("from the brainstorm", "because", {"lr": 0.01}, "brainstorm")]

    assert [s.title for s in directions("goal", [], [], brainstorm=Fixed())] == ["from the brainstorm"]


def test_combinations_skip_changes_run_together_or_contradicting():
    a = entry("a", "bone loss", outcome="kept", delta=1.0, change={"bone": 0.1}, exp_id="a")
    b = entry("b", "cosine", outcome="kept", delta=0.5, change={"sched": "cosine"}, exp_id="b")
    c = entry("c", "step decay", outcome="kept", delta=0.2, change={"sched": "step"}, exp_id="c")
    suggestions = combinations([a, b, c], tried=[{"bone": 0.1, "sched": "step"}])
    assert [dict(s.overrides) for s in suggestions] == [{"bone": 0.1, "sched": "cosine"}]  # b+c contradict, a+c ran


def test_with_a_space_only_improvements_within_it_are_combined():
    a = entry("a", "bone loss", outcome="kept", delta=1.0, change={"bone_loss_weight": 0.1}, exp_id="a")
    b = entry("b", "cosine", outcome="kept", delta=0.5, change={"lr_schedule": "cosine"}, exp_id="b")
    other = entry("z", "zeolite", outcome="kept", delta=2.0, change={"zeo": 1}, exp_id="z")  # another project's knob
    tried = [{"bone_loss_weight": 0.1}, {"lr_schedule": "cosine"}, {"zeo": 1}]
    assert len(combinations([other, a, b], tried)) == 4  # without a space: the three pairs and all three
    suggestions = directions("g", [other, a, b], tried, load_space(SPACE))
    combined = [dict(s.overrides) for s in suggestions if s.kind == "combine"]
    assert combined == [{"bone_loss_weight": 0.1, "lr_schedule": "cosine"}]


def test_unexplored_points_are_far_from_what_was_tried():
    space = load_space(SPACE)
    assert farthest_point(space["width"], [2048]) == (256, 0.75)  # log scale: 256 is 3 octaves from 2048
    assert farthest_point(space["bone_loss_weight"], [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]) is None
    titles = [s.title for s in unexplored(space, [{"lr_schedule": "cosine", "width": 2048}])]
    assert titles[:3] == ["explore bone_loss_weight=0.15", "explore dropout=0.25", "explore lr_schedule=step"]


# -- bad input: a real `cq` process, exit 2, nothing created --------------------------------------------


@pytest.mark.parametrize(("args", "expected"), [
    (["knowledge", "search", "  "], ["nothing to search for", "give words"]),
    (["knowledge", "search", "loss", "--limit", "0"], ["--limit 0", "give 1 to 1000"]),
    (["note", ""], ["the note is empty", "cq note"]),
    (["note", "good idea", "--tag", "two words"], ["--tag 'two words' is not a tag", "--tag pose"]),
    (["pi", "?!"], ["nothing to search for"]),
    (["pi", "improve MPJPE", "--space", "missing.yaml"],
     ["--space missing.yaml: no such file", "examples/pose/space.yaml"]),
    (["pi", "improve MPJPE", "--space", "bad.yaml"], ["bad.yaml line 1", "low 0.3 > high 0.1", "swap them"]),
    (["pi", "improve MPJPE", "--out", "no/such/folder/ideas.yaml"], ["does not exist", "mkdir -p"]),
    (["pi", "improve MPJPE", "--out", "taken.yaml"], ["exists", "--force"]),
], ids=["blank-query", "limit-0", "empty-note", "bad-tag", "pi-no-words", "space-missing", "space-invalid",
        "out-missing-folder", "out-exists"])
def test_bad_input_exits_2_and_creates_nothing(tmp_path, args, expected):
    import os
    import subprocess

    (tmp_path / "bad.yaml").write_text("dropout: {type: float, low: 0.3, high: 0.1}\n")
    (tmp_path / "taken.yaml").write_text("mine\n")
    # An MLflow file in a folder that does not exist: reading it fails (it is never created), and no stack starts.
    env = {**os.environ, "CQ_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": "sqlite:////nonexistent/cq/mlflow.db"}
    before = sorted(p.name for p in tmp_path.iterdir())
    output = subprocess.run([CQ, *args], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
                            stdin=subprocess.DEVNULL)
    assert output.returncode == 2, output.stdout + output.stderr
    for text in expected:
        assert text in output.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no CQ_HOME, no ideas file
    assert (tmp_path / "taken.yaml").read_text() == "mine\n"


# -- end to end: the real `cq` against the session stack's MLflow server (REST) -------------------------


def test_cli_against_the_stack_mlflow_server(stack, tmp_path):
    mlflow = mlflow_client(stack.mlflow_tracking_uri)
    word = f"zeolite{uuid.uuid4().hex[:6]}"  # a word no other test's records hold
    record_loop(mlflow, tmp_path, f"kb-{word}", "improve MPJPE below 18mm", "mpjpe", 30.0, [
        (f"{word} loss", "a new regulariser", {"zeo": 1}, "kept", 28.0, None),
        (f"{word} schedule", "a new schedule", {"zeo_sched": "cosine"}, "discarded", 29.0, None)])
    output = run_cq("note", f"{word} works best with warm-up", "--tag", "kb")
    assert output.returncode == 0, output.stderr
    output = run_cq("knowledge", "search", word, "--json")
    assert output.returncode == 0, output.stderr
    hits = json.loads(output.stdout)["hits"]
    assert (hits[0]["exp_id"], hits[0]["outcome"], hits[0]["delta"], hits[0]["improved"]) == (
        f"kb-{word}-c1-s0", "kept", 2.0, True)
    assert [h["text"] for h in hits if h["kind"] == "note"] == [f"{word} works best with warm-up"]
    output = run_cq("pi", f"improve {word} accuracy", "--out", str(tmp_path / "ideas.yaml"))
    assert output.returncode == 0, output.stderr
    assert "Loading related knowledge…" in output.stdout and f"kb-{word}-c1-s0" in output.stdout


def test_the_ideas_pi_writes_run_as_is_with_the_command_it_prints(stack, tmp_path):
    """`cq pi` ends with the `cq loop start --proposer scripted --ideas FILE …` to run its ideas (workdir, command
    and metric from the related loop): that command runs them, unchanged but for a smaller budget."""
    import shlex

    word = f"basalt{uuid.uuid4().hex[:6]}"
    (tmp_path / "train.py").write_text(
        "import argparse\n"
        "p = argparse.ArgumentParser()\n"
        "p.add_argument('--depth', type=int, default=2)\n"
        "p.add_argument('--act', default='relu')\n"
        "a = p.parse_args()\n"
        "print(f'@mpjpe={30 - a.depth - (2 if a.act == \"gelu\" else 0)}mm', flush=True)\n")
    record_loop(mlflow_client(stack.mlflow_tracking_uri), tmp_path, f"kb-{word}", "improve MPJPE below 18mm", "mpjpe",
                28.0, [(f"{word} deeper", "more layers", {"depth": 3}, "kept", 27.0, None),
                       (f"{word} gelu", "smoother", {"act": "gelu"}, "kept", 25.0, None)],
                command=f"{PYTHON} train.py")
    (tmp_path / "space.yaml").write_text("depth: {type: int, low: 2, high: 8}\nact: [relu, gelu, silu]\n")
    output = run_cq("pi", f"improve {word} mpjpe below 20", "--space", str(tmp_path / "space.yaml"),
                    "--out", str(tmp_path / "ideas.yaml"))
    assert output.returncode == 0, output.stderr
    command = output.stdout.split("Run them:\n", 1)[1].strip().splitlines()[0]
    assert command.startswith("cq loop start --proposer scripted --ideas ") and "TARGET" not in command
    first = load_ideas(tmp_path / "ideas.yaml")[0]
    argv = shlex.split(command)[1:] + ["--budget", "2", "--name", f"pi-{word}", "--json"]
    done = run_cq(*argv, timeout=240)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    value = 30.0 - first.overrides.get("depth", 2) - (2 if first.overrides.get("act") == "gelu" else 0)
    assert [(e["hypothesis"], e["outcome"], e["value"]) for e in status["experiments"]] == [
        ("baseline", "kept", 28.0), (first.title, "kept" if value < 28 else "discarded", value)]
