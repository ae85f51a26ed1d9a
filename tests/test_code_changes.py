"""cq_prefect.code_changes against real git repositories in tmp_path (no Prefect server)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from cq_prefect.code_changes import (
    Checkout,
    EditFailed,
    EditRejected,
    LoopRepo,
    apply_edits,
    check_edit_path,
    checkout_at,
    editable_files,
    glob_matches,
    workdir_at_commit,
)
from cq_prefect.errors import BadInput, CqError
from cq_prefect.records import Edit, Hypothesis

TRAIN = "lr = 0.1\nlayers = 4\n"
MODEL = "def model():\n    return 'resnet'\n"


@pytest.fixture(autouse=True)
def hermetic_git(monkeypatch, tmp_path):
    # Neither the machine's git config nor a surrounding git process may change what these tests see; with
    # no identity configured, every commit the module makes takes its fallback identity.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-global-gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL",
                 "GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME", "EMAIL"):
        monkeypatch.delenv(name, raising=False)


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=False,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def commit_all(cwd: Path, message: str) -> str:
    git(cwd, "add", "-A")
    git(cwd, "commit", "-q", "-m", message)
    return git(cwd, "rev-parse", "HEAD")


def branches(cwd: Path) -> list[str]:
    return git(cwd, "for-each-ref", "--format=%(refname:short)", "refs/heads").split()


def snapshot(root: Path) -> tuple:
    """What the user sees of their checkout: branch, HEAD, status, and every file's content."""
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
             if p.is_file() and ".git" not in p.relative_to(root).parts}
    return git(root, "rev-parse", "--abbrev-ref", "HEAD"), git(root, "rev-parse", "HEAD"), \
        git(root, "status", "--porcelain"), files


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "proj"
    (root / "src" / "nets").mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    (root / "train.py").write_text(TRAIN)
    (root / "model.py").write_text(MODEL)
    (root / "README.md").write_text("readme\n")
    (root / "src" / "nets" / "head.py").write_text("width = 64\n")
    commit_all(root, "baseline")
    return root


def hyp(title: str = "lower lr", *edits: Edit, rationale: str = "loss plateaus") -> Hypothesis:
    return Hypothesis(title=title, rationale=rationale, edits=edits)


LOWER_LR = Edit(path="train.py", old="lr = 0.1", new="lr = 0.05")


# ----------------------------------------------------------------------------------------------- path safety


@pytest.mark.parametrize(
    "path, why",
    [
        ("../secret.py", "'..'"),
        ("src/../../secret.py", "'..'"),
        ("/etc/passwd.py", "absolute"),
        ("~/x.py", "'~'"),
        ("src\\x.py", "backslash"),
        ("x\x00.py", "NUL"),
        (".git/config", ".git"),
        ("src/.git/hooks/pre-commit", ".git"),
        ("", "empty"),
        ("./", "workdir itself"),
    ],
)
def test_check_edit_path_rejects_unsafe_paths(path, why):
    with pytest.raises(EditRejected) as info:
        check_edit_path(path, ["**"])  # everything editable: the path itself must be what is refused
    assert why in str(info.value) and repr(path) in str(info.value)


def test_check_edit_path_rejects_paths_no_glob_allows():
    with pytest.raises(EditRejected, match=r"'src/model.py' is not editable.*\['\*.py'\].*code.editable"):
        check_edit_path("src/model.py", ["*.py"])
    assert check_edit_path("./src//model.py", ["src/**/*.py"]) == "src/model.py"


@pytest.mark.parametrize(
    "path, pattern, expected",
    [
        ("train.py", "*.py", True),
        ("src/train.py", "*.py", False),
        ("src/train.py", "src/**/*.py", True),
        ("src/a/b/train.py", "src/**/*.py", True),
        ("srcx/train.py", "src/**/*.py", False),
        ("train.py", "**/*.py", True),
        ("a/b/c.yaml", "**", True),
        ("configs/a/b.yaml", "configs/", True),
        ("configs.yaml", "configs/", False),
        ("a.py", "[ab].py", True),
        ("c.py", "[!ab].py", True),
        ("a.py", "[!ab].py", False),
        ("ab.py", "?.py", False),
        ("Train.py", "train.py", False),
        ("].py", "[]].py", True),
        ("src/x.py", "./src/*", True),
        ("src/x/y.py", "src/*", False),
        ("a/b/x.py", "**/b/*.py", True),
        ("b/x.py", "**/b/*.py", True),
        ("a/c/x.py", "**/b/*.py", False),
    ],
)
def test_globs_match_whole_paths_component_by_component(path, pattern, expected):
    assert glob_matches(path, [pattern]) is expected


# ------------------------------------------------------------------------------------------------ apply_edits


def test_apply_edits_refuses_a_symlinked_file_and_leaves_its_target_alone(tmp_path):
    outside = tmp_path / "outside.py"
    outside.write_text("x = 1\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "link.py").symlink_to(outside)
    with pytest.raises(EditRejected, match="'link.py'.*it is a symlink"):
        apply_edits(workdir, [Edit(path="link.py", old="x = 1", new="x = 2")], ["*.py"])
    assert outside.read_text() == "x = 1\n"


def test_apply_edits_refuses_a_symlinked_parent_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.py").write_text("x = 1\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "lib").symlink_to(outside)
    for edit in (Edit(path="lib/x.py", old="x = 1", new="x = 2"), Edit(path="lib/new.py", old="", new="y\n")):
        with pytest.raises(EditRejected, match="its directory 'lib' is a symlink"):
            apply_edits(workdir, [edit], ["**/*.py"])
    assert sorted(p.name for p in outside.iterdir()) == ["x.py"]
    assert (outside / "x.py").read_text() == "x = 1\n"


def test_apply_edits_applies_in_order_and_creates_files(tmp_path):
    (tmp_path / "train.py").write_bytes(b"lr = 0.1\r\nlayers = 4\r\n")
    changed = apply_edits(tmp_path, [
        Edit(path="train.py", old="lr = 0.1", new="lr = 0.05"),
        Edit(path="src/aug/flip.py", old="", new="FLIP = True\n"),
        Edit(path="train.py", old="lr = 0.05", new="lr = 0.02"),  # sees the first edit's result
        Edit(path="src/aug/flip.py", old="True", new="False"),
    ], ["*.py", "src/**/*.py"])
    assert changed == ["train.py", "src/aug/flip.py"]
    assert (tmp_path / "train.py").read_bytes() == b"lr = 0.02\r\nlayers = 4\r\n"  # line endings untouched
    assert (tmp_path / "src" / "aug" / "flip.py").read_text() == "FLIP = False\n"


def test_apply_edits_leaves_out_edits_that_change_nothing(tmp_path):
    (tmp_path / "train.py").write_text(TRAIN)
    assert apply_edits(tmp_path, [Edit(path="train.py", old="lr", new="lr")], ["*.py"]) == []


@pytest.mark.parametrize(
    "edit, message",
    [
        (Edit(path="train.py", old="lr = 0.3", new="x"), r"cannot edit train.py: the old text 'lr = 0.3' was not"),
        (Edit(path="train.py", old=" = ", new="="), r"cannot edit train.py: the old text ' = ' occurs 2 times"),
        (Edit(path="gone.py", old="x", new="y"), r"cannot edit gone.py: the file does not exist.*empty old"),
        (Edit(path="train.py", old="", new="x"), r"cannot create train.py: it already exists"),
    ],
)
def test_apply_edits_fails_cleanly_when_an_edit_does_not_fit(tmp_path, edit, message):
    (tmp_path / "train.py").write_text(TRAIN)
    with pytest.raises(EditFailed, match=message):
        apply_edits(tmp_path, [edit], ["*.py"])
    assert (tmp_path / "train.py").read_text() == TRAIN


def test_apply_edits_is_all_or_nothing(tmp_path):
    (tmp_path / "train.py").write_text(TRAIN)
    edits = [LOWER_LR, Edit(path="new.py", old="", new="x\n"), Edit(path="train.py", old="missing", new="")]
    with pytest.raises(EditFailed, match="missing"):
        apply_edits(tmp_path, edits, ["*.py"])
    assert (tmp_path / "train.py").read_text() == TRAIN
    assert not (tmp_path / "new.py").exists()
    with pytest.raises(EditRejected):  # a rejected path late in the list also stops the earlier edits
        apply_edits(tmp_path, [LOWER_LR, Edit(path="../x.py", old="", new="")], ["*.py"])
    assert (tmp_path / "train.py").read_text() == TRAIN


# --------------------------------------------------------------------------------------------- editable_files


def test_editable_files_shows_tracked_and_unignored_text_files(repo):
    (repo / ".gitignore").write_text("ignored.py\n")
    (repo / "ignored.py").write_text("x\n")
    (repo / "untracked.py").write_text("u = 1\n")
    (repo / "weights.py").write_bytes(b"\x00\x01binary")
    (repo / "link.py").symlink_to(repo / "train.py")
    files = editable_files(repo, ["*.py"])
    assert files == {"model.py": MODEL, "train.py": TRAIN, "untracked.py": "u = 1\n"}


def test_editable_files_caps_each_file_and_the_total(tmp_path):
    (tmp_path / "a.py").write_text("".join(f"line {i}\n" for i in range(100)))  # 790 bytes, cut at 94
    (tmp_path / "b.py").write_text("b\n" * 100)
    (tmp_path / "c.py").write_text("c\n" * 20)
    (tmp_path / ".git").mkdir()  # not a repository: the fallback walk must still skip .git
    (tmp_path / ".git" / "x.py").write_text("no\n")
    files = editable_files(tmp_path, ["*.py", "**"], max_bytes_per_file=100, max_total_bytes=300)
    assert files["a.py"].startswith("line 0\n")
    assert files["a.py"].endswith("line 12\n[cq: 696 more bytes of a.py left out]\n")
    assert len(files["a.py"]) < 150
    assert files["b.py"].endswith("[cq: 100 more bytes of b.py left out]\n")
    assert files["[cq: 1 more files left out]"] == "c.py\n"
    assert list(files) == ["a.py", "b.py", "[cq: 1 more files left out]"]


def test_files_at_reads_a_commit_and_caps_as_editable_files_does(repo):
    # What Claude is shown in a code loop: the files at the best commit, not the checkout, cut the same way.
    work = repo / "src"
    (work / "a.py").write_text("".join(f"line {i}\n" for i in range(100)))
    (work / "b.py").write_text("b\n" * 100)
    (work / "c.py").write_text("c\n" * 20)
    (work / "weights.py").write_bytes(b"\0\1binary")
    commit = commit_all(repo, "more files")
    expected = editable_files(work, ["*.py", "nets/*.py"], max_bytes_per_file=100, max_total_bytes=300)
    loop = LoopRepo.open(work, "pose", ["*.py", "nets/*.py"])
    (work / "a.py").write_text("changed after the commit\n")  # the checkout is not what is shown
    files = loop.files_at(commit, 100, 300)
    assert files == expected and "weights.py" not in files
    assert files["a.py"].endswith("line 12\n[cq: 696 more bytes of a.py left out]\n")
    assert list(files) == ["a.py", "b.py", "[cq: 3 more files left out]"]
    assert files["[cq: 3 more files left out]"] == "c.py\nnets/head.py\nweights.py\n"
    assert loop.files_at(commit) == {"a.py": "".join(f"line {i}\n" for i in range(100)), "b.py": "b\n" * 100,
                                     "c.py": "c\n" * 20, "nets/head.py": "width = 64\n"}


# ------------------------------------------------------------------------------------------------------ open


def test_open_names_git_init_when_the_workdir_is_no_repository(tmp_path):
    with pytest.raises(BadInput, match=r"is not a git repository; code edits need one: cd .* && git init"):
        LoopRepo.open(tmp_path, "pose", ["*.py"])


def test_open_needs_a_first_commit(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text(TRAIN)
    with pytest.raises(BadInput, match="has no commit yet.*git commit -m baseline"):
        LoopRepo.open(tmp_path, "pose", ["*.py"])


def test_open_refuses_uncommitted_editable_files_but_not_others(repo):
    (repo / "README.md").write_text("changed, but not editable\n")
    (repo / "notes.txt").write_text("untracked, not editable\n")
    LoopRepo.open(repo, "pose", ["*.py"])
    (repo / "train.py").write_text("lr = 1\n")
    (repo / "extra.py").write_text("untracked and editable\n")
    git(repo, "rm", "-q", "--cached", "model.py")  # a staged deletion counts too
    before = snapshot(repo)
    with pytest.raises(BadInput, match=r"uncommitted changes: extra.py, model.py, train.py;.*git stash -u") as info:
        LoopRepo.open(repo, "pose", ["*.py"])
    assert "README.md" not in str(info.value)
    assert snapshot(repo) == before


def test_open_records_where_the_loop_starts(repo):
    (repo / "examples" / "pose").mkdir(parents=True)
    loop = LoopRepo.open(repo / "examples" / "pose", "pose", ["*.py"])
    assert (loop.root, loop.subdir, loop.start_branch) == (repo.resolve(), "examples/pose", "main")
    assert loop.start_commit == git(repo, "rev-parse", "HEAD")
    assert (loop.branch("exp-1"), loop.best_branch) == ("cq/pose/exp-1", "cq/pose/best")
    git(repo, "checkout", "-q", "--detach")
    assert LoopRepo.open(repo, "pose", ["*.py"]).start_branch is None
    with pytest.raises(BadInput, match="cannot name a git branch"):
        LoopRepo.open(repo, "a/b", ["*.py"])
    with pytest.raises(BadInput, match="editable glob '../\\*.py' is invalid"):
        LoopRepo.open(repo, "pose", ["../*.py"])


# ---------------------------------------------------------------------------------------------------- prepare


def test_prepare_commits_the_edits_on_the_experiment_branch_in_its_own_worktree(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    before = snapshot(repo)
    checkout = loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR, Edit(path="aug.py", old="",
                                                                                        new="FLIP = 1\n")))
    assert isinstance(checkout, Checkout)
    assert checkout.branch == "cq/pose/exp-1"
    assert checkout.changed == ("train.py", "aug.py")
    assert checkout.workdir == loop.common_dir / "cq-worktrees" / "pose" / "exp-1"
    assert checkout.workdir == (repo / ".git" / "cq-worktrees" / "pose" / "exp-1").resolve()
    assert (checkout.workdir / "train.py").read_text() == "lr = 0.05\nlayers = 4\n"
    assert (checkout.workdir / "aug.py").read_text() == "FLIP = 1\n"
    assert git(repo, "rev-parse", "cq/pose/exp-1") == checkout.commit
    assert git(repo, "rev-parse", f"{checkout.commit}^") == loop.start_commit
    assert git(repo, "log", "-1", "--format=%B", checkout.commit) == "lower lr\n\nloss plateaus\n\ncq-loop: pose exp-1"
    assert git(repo, "log", "-1", "--format=%ae", checkout.commit) == "cq-prefect@localhost"
    assert git(checkout.workdir, "status", "--porcelain") == ""
    assert git(repo, "diff", "--name-only", loop.start_commit, checkout.commit).split() == ["aug.py", "train.py"]
    assert snapshot(repo) == before  # the user's checkout: same branch, HEAD, status and files


def test_prepare_uses_the_configured_identity_and_keeps_markdown_in_the_rationale(repo):
    git(repo, "config", "user.email", "me@example.com")
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    checkout = loop.prepare("exp-1", "HEAD", hyp("x", LOWER_LR, rationale="# Why\nbecause"))
    shown = git(repo, "log", "-1", "--format=%ae%n%B", checkout.commit)
    assert shown == "me@example.com\nx\n\n# Why\nbecause\n\ncq-loop: pose exp-1"


def test_prepare_without_edits_runs_at_base_without_a_commit(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    checkout = loop.prepare("exp-1", loop.start_commit, Hypothesis(title="lr", change={"lr": 0.01}))
    assert checkout.commit == loop.start_commit == git(repo, "rev-parse", "cq/pose/exp-1")
    assert checkout.changed == ()
    assert (checkout.workdir / "train.py").read_text() == TRAIN
    assert workdir_at_commit(checkout.workdir, loop.start_commit)


def test_prepare_again_reuses_the_experiment_commit(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    hypothesis = hyp("lower lr", LOWER_LR)
    first = loop.prepare("exp-1", loop.start_commit, hypothesis)
    (first.workdir / "outputs.log").write_text("from the first attempt\n")
    again = loop.prepare("exp-1", loop.start_commit, hypothesis)  # re-applying would fail: lr = 0.1 is gone
    assert again == first
    assert (again.workdir / "outputs.log").exists()  # the worktree itself was kept
    loop.remove_worktree("exp-1")
    assert not first.workdir.exists() and "cq/pose/exp-1" in branches(repo)
    third = loop.prepare("exp-1", loop.start_commit, hypothesis)  # branch kept, worktree made again
    assert third == first and (third.workdir / "train.py").read_text().startswith("lr = 0.05")
    assert git(repo, "rev-list", "--count", "cq/pose/exp-1") == "2"


def test_removing_a_worktree_never_follows_links_out_of_it(repo, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.bin").write_text("precious\n")
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    checkout = loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR))
    (checkout.workdir / "data").symlink_to(data)  # how a loop shows an experiment its untracked data
    loop.remove_worktree("exp-1")
    assert not checkout.workdir.exists()
    assert (data / "train.bin").read_text() == "precious\n"


def test_prepare_redoes_a_branch_left_without_its_commit(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    git(repo, "branch", "cq/pose/exp-1", loop.start_commit)  # an attempt that died before committing
    checkout = loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR))
    assert checkout.commit != loop.start_commit and checkout.changed == ("train.py",)


@pytest.mark.parametrize(
    "edit, error",
    [(Edit(path="train.py", old="nope", new="x"), EditFailed), (Edit(path="data.csv", old="", new="x"), EditRejected)],
)
def test_prepare_that_fails_leaves_no_branch_and_no_worktree(repo, edit, error):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    with pytest.raises(error):
        loop.prepare("exp-1", loop.start_commit, hyp("bad", LOWER_LR, edit))
    assert branches(repo) == ["main"]
    assert not loop.worktree("exp-1").exists()
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1


def test_set_best_then_prepare_from_best_builds_on_it(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    before = snapshot(repo)
    first = loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR))
    loop.set_best(first.commit)
    assert git(repo, "rev-parse", "cq/pose/best") == first.commit
    second = loop.prepare("exp-2", loop.best_branch, hyp("deeper", Edit(path="train.py", old="4", new="6")))
    assert git(repo, "rev-parse", f"{second.commit}^") == first.commit
    assert (second.workdir / "train.py").read_text() == "lr = 0.05\nlayers = 6\n"
    loop.set_best(second.commit)  # moves
    assert git(repo, "rev-parse", "cq/pose/best") == second.commit
    assert snapshot(repo) == before


# ------------------------------------------------------------------------------------------------- merge_best


def test_merge_best_fast_forwards_the_checked_out_start_branch(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    best = loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR))
    loop.set_best(best.commit)
    (repo / "README.md").write_text("a local change the merge does not touch\n")
    assert loop.merge_best() == best.commit
    assert git(repo, "rev-parse", "main") == best.commit
    assert (repo / "train.py").read_text() == "lr = 0.05\nlayers = 4\n"
    assert (repo / "README.md").read_text() == "a local change the merge does not touch\n"
    assert loop.merge_best() == best.commit  # nothing new: nothing to do


def test_merge_best_makes_a_merge_commit_when_the_branch_moved(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    best = loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR))
    loop.set_best(best.commit)
    (repo / "README.md").write_text("the user kept working\n")
    user = commit_all(repo, "docs")
    merged = loop.merge_best()
    assert git(repo, "rev-parse", "HEAD") == merged
    assert git(repo, "log", "-1", "--format=%P", merged).split() == [user, best.commit]
    assert git(repo, "log", "-1", "--format=%s", merged) == "Merge cq/pose/best (1 commit: lower lr)"
    assert (repo / "train.py").read_text().startswith("lr = 0.05")
    assert (repo / "README.md").read_text() == "the user kept working\n"
    assert git(repo, "status", "--porcelain") == ""


def test_merge_best_refuses_to_touch_files_with_uncommitted_changes(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    loop.set_best(loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR)).commit)
    (repo / "train.py").write_text("my local edit\n")
    with pytest.raises(BadInput, match=r"uncommitted changes in .*: train.py; commit or stash them"):
        loop.merge_best()
    assert git(repo, "rev-parse", "main") == loop.start_commit
    assert (repo / "train.py").read_text() == "my local edit\n"


def test_merge_best_refuses_conflicts_without_leaving_markers(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    loop.set_best(loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR)).commit)
    (repo / "train.py").write_text("lr = 0.3\nlayers = 4\n")
    user = commit_all(repo, "mine")
    with pytest.raises(BadInput, match="conflicts with main in train.py; merge by hand"):
        loop.merge_best()
    assert git(repo, "rev-parse", "HEAD") == user and git(repo, "status", "--porcelain") == ""


def test_merge_best_moves_only_the_ref_when_the_branch_is_not_checked_out(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    best = loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR))
    loop.set_best(best.commit)
    git(repo, "checkout", "-q", "-b", "other")
    (repo / "train.py").write_text("dirty on other\n")
    assert loop.merge_best() == best.commit
    assert git(repo, "rev-parse", "main") == best.commit
    assert git(repo, "rev-parse", "HEAD") == loop.start_commit
    assert (repo / "train.py").read_text() == "dirty on other\n"


def test_merge_best_needs_a_start_branch_and_a_best(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    with pytest.raises(BadInput, match="cq/pose/best does not exist yet"):
        loop.merge_best()
    git(repo, "checkout", "-q", "--detach")
    detached = LoopRepo.open(repo, "pose", ["*.py"])
    detached.set_best(detached.prepare("exp-1", "HEAD", hyp("lower lr", LOWER_LR)).commit)
    with pytest.raises(BadInput, match="detached HEAD.*git checkout -b NAME"):
        detached.merge_best()


# ------------------------------------------------------------------------------------------- prune and push


def test_prune_keeps_best_the_keep_list_and_other_loops(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    for exp in ("exp-1", "exp-2", "exp-3"):
        loop.prepare(exp, loop.start_commit, Hypothesis(title=exp))
    loop.set_best(loop.start_commit)
    for other in ("pose2", "pose-b"):
        LoopRepo.open(repo, other, ["*.py"]).prepare("exp-1", "HEAD", Hypothesis(title="x"))
    assert loop.prune(keep=["exp-2"]) == ["cq/pose/exp-1", "cq/pose/exp-3"]
    assert branches(repo) == ["cq/pose-b/exp-1", "cq/pose/best", "cq/pose/exp-2", "cq/pose2/exp-1", "main"]
    assert not loop.worktree("exp-1").exists() and not loop.worktree("exp-3").exists()
    assert loop.worktree("exp-2").is_dir()
    assert LoopRepo.open(repo, "pose2", ["*.py"]).worktree("exp-1").is_dir()
    assert loop.prune() == ["cq/pose/exp-2"]


def test_push_force_pushes_branches(repo, tmp_path):
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    checkout = loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR))
    loop.set_best(checkout.commit)
    loop.push(str(remote), checkout.branch, loop.best_branch)
    assert git(remote, "rev-parse", "cq/pose/exp-1", "cq/pose/best").split() == [checkout.commit] * 2
    loop.set_best(loop.start_commit)  # best moved backwards: only a forced push follows
    loop.push(str(remote), loop.best_branch)
    assert git(remote, "rev-parse", "cq/pose/best") == loop.start_commit
    with pytest.raises(CqError, match="git push to .*nowhere.* failed"):
        loop.push(str(tmp_path / "nowhere"), loop.best_branch)


# ------------------------------------------------------------------------------------------ remote workers


def test_a_code_loop_with_a_remote_pushes_each_experiment_for_workers_elsewhere_to_clone(repo, tmp_path):
    # code.remote: a worker on another host lacks the worktree, so it clones the spec's GitSource at the commit.
    from cq_prefect.loop_code import LoopCode
    from cq_prefect.loop_config import LoopConfig

    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    git(repo, "remote", "add", "origin", str(remote))
    config = LoopConfig.parse({
        "name": "pose", "goal": "loss below 1", "metric": "loss", "budget": 3,
        "experiment": {"workdir": str(repo / "src"), "command": "python train.py"},
        "proposer": {"kind": "scripted", "ideas": [{"title": "a", "edits": [{"path": "nets/head.py", "old": "64",
                                                                              "new": "128"}]}]},
        "code": {"editable": ["**/*.py"], "remote": "origin"}}, source="config")
    code = LoopCode.open(config)
    prepared = code.prepare("exp-1", hyp("wider head", Edit(path="nets/head.py", old="64", new="128")), [])
    assert (prepared.source.url, prepared.source.commit, prepared.source.subdir) == (str(remote), prepared.commit, "src")
    assert git(remote, "rev-parse", "cq/pose/exp-1") == prepared.commit
    elsewhere = checkout_at(prepared.source.url, prepared.source.commit, prepared.source.subdir, tmp_path / "cache")
    assert (elsewhere / "nets" / "head.py").read_text() == "width = 128\n"


def test_checkout_at_makes_the_commit_available_and_reuses_it(repo, tmp_path):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    first = loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR))
    cache = tmp_path / "cache"
    workdir = checkout_at(str(repo), first.commit, "", cache)
    assert workdir == cache / "commits" / first.commit
    assert (workdir / "train.py").read_text().startswith("lr = 0.05")
    assert workdir_at_commit(workdir, first.commit) and not workdir_at_commit(workdir, loop.start_commit)
    (workdir / "marker").write_text("kept\n")
    assert checkout_at(str(repo), first.commit, "", cache) == workdir and (workdir / "marker").exists()
    # A commit made after the mirror was: fetched on demand, from a file:// URL too (a different mirror).
    second = loop.prepare("exp-2", loop.start_commit, hyp("deeper", Edit(path="train.py", old="4", new="6")))
    assert (checkout_at(str(repo), second.commit, ".", cache) / "train.py").read_text().endswith("layers = 6\n")
    assert checkout_at(f"file://{repo}", second.commit, "", cache) == cache / "commits" / second.commit
    assert len(list((cache / "mirrors").iterdir())) == 2


def test_checkout_at_says_when_the_commit_was_not_pushed(repo, tmp_path):
    missing = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(CqError, match=f"commit {missing} not found in .*was the branch pushed"):
        checkout_at(str(repo), missing, "", tmp_path / "cache")


def test_checkout_at_is_safe_when_called_at_once(repo, tmp_path):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    commit = loop.prepare("exp-1", loop.start_commit, hyp("lower lr", LOWER_LR)).commit
    results: list = []

    def call():
        try:
            results.append(checkout_at(str(repo), commit, "", tmp_path / "cache"))
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "cache" / "commits" / commit] * 4


def test_prepare_is_safe_for_parallel_experiments(repo):
    loop = LoopRepo.open(repo, "pose", ["*.py"])
    results: dict = {}

    def call(exp: str):
        try:
            results[exp] = loop.prepare(exp, loop.start_commit, hyp(exp, Edit(path=f"{exp}.py", old="", new="x\n")))
        except Exception as exc:  # noqa: BLE001
            results[exp] = exc

    threads = [threading.Thread(target=call, args=(f"exp-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(r, Checkout) for r in results.values()), results
    assert sorted(results) == [f"exp-{i}" for i in range(4)]
    assert all((results[exp].workdir / f"{exp}.py").exists() for exp in results)


# ------------------------------------------------------------------------------------- a workdir in a subdir


def test_a_workdir_below_the_repository_top(repo, tmp_path):
    pose = repo / "examples" / "pose"
    pose.mkdir(parents=True)
    (pose / "train.py").write_text(TRAIN)
    commit_all(repo, "pose example")
    (repo / "train.py").write_text("dirty, but outside the workdir\n")
    loop = LoopRepo.open(pose, "pose", ["*.py"])
    assert loop.subdir == "examples/pose"
    with pytest.raises(EditRejected):
        loop.prepare("exp-0", "HEAD", hyp("escape", Edit(path="../../model.py", old="resnet", new="vit")))
    checkout = loop.prepare("exp-1", "HEAD", hyp("lower lr", LOWER_LR))
    assert checkout.workdir == loop.worktree("exp-1") / "examples" / "pose"
    assert checkout.changed == ("train.py",)
    assert (checkout.workdir / "train.py").read_text().startswith("lr = 0.05")
    assert (loop.worktree("exp-1") / "train.py").read_text() == TRAIN  # the top-level file: untouched
    assert git(repo, "diff", "--name-only", "HEAD", checkout.commit) == "examples/pose/train.py"
    loop.remove_worktree("exp-1")
    again = loop.prepare("exp-1", "HEAD", hyp("lower lr", LOWER_LR))
    assert again.changed == ("train.py",) and again.commit == checkout.commit
    remote = checkout_at(str(repo), checkout.commit, loop.subdir, tmp_path / "cache")
    assert remote == tmp_path / "cache" / "commits" / checkout.commit / "examples" / "pose"
    assert (remote / "train.py").read_text().startswith("lr = 0.05")
    assert (repo / "train.py").read_text() == "dirty, but outside the workdir\n"


def test_workdir_at_commit_outside_a_repository(tmp_path):
    assert not workdir_at_commit(tmp_path, "0123456")
    assert not workdir_at_commit(tmp_path / "missing", "0123456")
    assert "GIT_DIR" not in os.environ


# --------------------------------------------------------------------------------------- LoopCode (the loop's side)


@pytest.mark.parametrize("direction, expected", [("minimize", "exp-1"), ("maximize", "exp-2")])
def test_the_best_kept_experiment_is_the_base_even_when_a_later_slot_finished_first(repo, direction, expected):
    # Two experiments side by side: slot 1 (exp-2) finished first and was kept; slot 0 (exp-1) finished later,
    # beat it and was kept too. The history is in the order they started, so "the last kept" would be exp-2.
    from cq_prefect.loop_code import LoopCode
    from cq_prefect.loop_config import LoopConfig
    from cq_prefect.records import ExperimentRecord

    config = LoopConfig.parse({
        "name": "pose", "goal": "a better loss", "metric": "loss", "direction": direction, "target": 1.0, "budget": 5,
        "parallel": 2, "experiment": {"workdir": str(repo), "command": "python train.py"},
        "proposer": {"kind": "scripted", "ideas": [{"title": "a", "edits": [{"path": "train.py", "old": "4",
                                                                              "new": "5"}]}]},
        "code": {"editable": ["*.py"]}}, source="config")
    code = LoopCode.open(config)
    first = code.prepare("exp-1", hyp("lower lr", LOWER_LR), [])
    second = code.prepare("exp-2", hyp("deeper", Edit(path="train.py", old="4", new="6")), [])
    history = [
        ExperimentRecord(exp_id="exp-0", cycle=0, hypothesis=Hypothesis(title="Baseline"), outcome="kept",
                         value=30.0, commit=code.repo.start_commit),
        ExperimentRecord(exp_id="exp-1", cycle=1, slot=0, hypothesis=hyp("lower lr", LOWER_LR),
                         outcome="kept" if direction == "minimize" else "discarded", value=10.0,
                         commit=first.commit),
        ExperimentRecord(exp_id="exp-2", cycle=1, slot=1, hypothesis=hyp("deeper"), outcome="kept",
                         value=20.0 if direction == "minimize" else 40.0, commit=second.commit),
    ]
    commits = {"exp-1": first.commit, "exp-2": second.commit}
    assert code.base_commit(history) == commits[expected]
    assert code.finish(history)["best_commit"] == commits[expected]
    assert git(repo, "rev-parse", "cq/pose/best") == commits[expected]
    assert code.base_commit(history[:1]) == code.repo.start_commit
