"""Code changes of a research loop in git: safe edits, one branch and worktree per experiment; no Prefect import.

A hypothesis with ``edits`` runs on its own branch, ``cq/<loop>/<exp_id>``, checked out in its own worktree
under the repository's git directory, so the user's checkout is never touched while the loop runs:

    >>> repo = LoopRepo.open("examples/pose", loop="pose", editable=["*.py"])      # doctest: +SKIP
    >>> checkout = repo.prepare("exp-007", repo.start_commit, hypothesis)           # doctest: +SKIP
    >>> checkout.branch, checkout.workdir                                           # doctest: +SKIP
    ('cq/pose/exp-007', PosixPath('/src/proj/.git/cq-worktrees/pose/exp-007/examples/pose'))
    >>> repo.set_best(checkout.commit); repo.merge_best()                           # doctest: +SKIP
    '5d1c0e…'

Where an edit may write is decided here, not by whoever proposed it (:func:`check_edit_path`): a path
relative to the workdir, matching one of the loop's ``editable`` globs, with no ``..``, no ``.git`` and no
symlink on the way. Globs match whole relative paths: ``*`` and ``?`` never cross a ``/``, ``**`` spans
any number of directories, so ``*.py`` is the top-level Python files only and ``**/*.py`` all of them.

A worker on another host gets the same files with :func:`checkout_at` (after :meth:`LoopRepo.push`).
Everything runs the ``git`` command line, never prompting (``GIT_TERMINAL_PROMPT=0``); commits made here
skip the repository's hooks and signing, because they record exactly the edits a hypothesis made.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from cq_prefect.errors import BadInput, CqError
from cq_prefect.records import Edit, Hypothesis

__all__ = [
    "Checkout",
    "EditFailed",
    "EditRejected",
    "GitError",
    "LoopRepo",
    "apply_edits",
    "check_edit_path",
    "checkout_at",
    "editable_files",
    "glob_matches",
    "workdir_at_commit",
]

_FALLBACK_IDENTITY = ("-c", "user.name=cq-prefect", "-c", "user.email=cq-prefect@localhost")
# Set by a hook or a parent git process, these would point every `git -C DIR` at another repository.
_GIT_LOCATION_VARS = (
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR", "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_PREFIX", "GIT_CEILING_DIRECTORIES",
)
# Loop names and exp ids become ref components and directory names: keep them boring.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_HEX = re.compile(r"[0-9a-fA-F]{4,64}")


class EditRejected(BadInput):
    """An edit names a path it may not write: unsafe (absolute, ``..``, ``.git``, a symlink) or not editable."""


class EditFailed(CqError):
    """An edit could not be applied: its old text is missing or not unique, or the file is missing or exists."""


class GitError(CqError):
    """A git command failed unexpectedly; the message has the command and what git said."""


# --------------------------------------------------------------------------------------------- globs and paths


def _split_glob(pattern: str) -> tuple[str, ...]:
    pattern = pattern.strip()
    while pattern.startswith("./"):
        pattern = pattern[2:]
    if pattern.endswith("/"):  # a directory: everything under it
        pattern += "**"
    return tuple(part for part in pattern.split("/") if part not in ("", "."))


def _match_parts(parts: Sequence[str], segments: Sequence[str]) -> bool:
    # Component by component, so that `*`, `?` and `[…]` (fnmatch's) can never match a '/'.
    if not segments:
        return not parts
    if segments[0] == "**":
        if len(segments) == 1:
            return len(parts) >= 1  # a trailing ** is the files at any depth below
        return any(_match_parts(parts[i:], segments[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], segments[0]) and _match_parts(parts[1:], segments[1:])


def glob_matches(path: str, patterns: Sequence[str]) -> bool:
    """Whether the relative POSIX ``path`` matches one of the globs (case-sensitive, like git on Linux).

    ``*``, ``?`` and ``[abc]`` stay within one path component; a ``**`` component spans any number of
    directories (none included); a pattern ending in ``/`` means everything under that directory.

        >>> glob_matches("train.py", ["*.py"]), glob_matches("src/model.py", ["*.py"])
        (True, False)
        >>> glob_matches("src/model.py", ["src/**/*.py"]), glob_matches("src/nets/a/b.py", ["src/**/*.py"])
        (True, True)
        >>> glob_matches("configs/x/y.yaml", ["configs/"]), glob_matches("configs.yaml", ["configs/"])
        (True, False)
    """
    parts = path.split("/")
    return any(_match_parts(parts, _split_glob(pattern)) for pattern in patterns)


def _normalise(path: str) -> tuple[str | None, str]:
    """``(relative posix path, '')`` or ``(None, why it is unsafe)``."""
    if not path or not path.strip():
        return None, "it is empty"
    if "\x00" in path:
        return None, "it contains a NUL byte"
    if "\\" in path:
        return None, "it contains a backslash; use '/' between directories"
    if path.startswith("/"):
        return None, "it is absolute; give it relative to the workdir"
    if path.startswith("~"):
        return None, "it starts with '~'; give it relative to the workdir"
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None, "it has a '..' component; edits stay inside the workdir"
    if any(part.lower() == ".git" for part in parts):
        return None, "it is inside .git; git's own files are not editable"
    if not parts:
        return None, "it names the workdir itself, not a file"
    return "/".join(parts), ""


def check_edit_path(path: str, editable: Sequence[str]) -> str:
    """The edit path normalised (relative, POSIX, no ``./``); :class:`EditRejected` when it may not be written.

        >>> check_edit_path("./src//model.py", ["src/**/*.py"])
        'src/model.py'
        >>> check_edit_path("../secrets.py", ["**/*.py"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        cq_prefect.code_changes.EditRejected: edit path '../secrets.py' is rejected: it has a '..' component; ...
        >>> check_edit_path("data/train.csv", ["*.py"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        cq_prefect.code_changes.EditRejected: edit path 'data/train.csv' is not editable: it matches none of ...

    The checks of the file system (symlinks on the way, staying inside the workdir) are :func:`apply_edits`'s.
    """
    normalised, why = _normalise(path)
    if normalised is None:
        raise EditRejected(f"edit path {path!r} is rejected: {why}")
    if not glob_matches(normalised, editable):
        raise EditRejected(
            f"edit path {path!r} is not editable: it matches none of the loop's editable globs "
            f"{list(editable)!r}; add a glob to code.editable to allow it"
        )
    return normalised


def _check_on_disk(workdir: Path, rel: str) -> Path:
    """The file's path after refusing any symlink between ``workdir`` and it (itself included)."""
    target = workdir
    parts = rel.split("/")
    for index, part in enumerate(parts):
        target = target / part
        if target.is_symlink():
            where = "it is a symlink" if index == len(parts) - 1 else (
                f"its directory {'/'.join(parts[: index + 1])!r} is a symlink"
            )
            raise EditRejected(f"edit path {rel!r} is rejected: {where}; edits never follow symlinks")
    root = workdir.resolve()
    resolved = (workdir / rel).resolve()
    if resolved != root and root not in resolved.parents:
        raise EditRejected(f"edit path {rel!r} is rejected: it resolves to {resolved}, outside {root}")
    return workdir / rel


def _describe(text: str, limit: int = 60) -> str:
    """The old text in a message: its first line with content, shortened; whitespace kept (it matters)."""
    line = next((line for line in text.splitlines() if line.strip()), text)
    more = line != text
    return repr(line if len(line) <= limit else line[:limit]) + (" …" if more or len(line) > limit else "")


def apply_edits(workdir: Path, edits: Sequence[Edit], editable: Sequence[str]) -> list[str]:
    """Apply ``edits`` in order to the files under ``workdir``; the relative paths whose content changed.

    All or nothing: every edit is checked and every new content computed before the first file is written
    (a later edit sees the result of the earlier ones on the same file), and a failed write puts back what
    was written. Raises :class:`EditRejected` for a path that may not be written, :class:`EditFailed` for an
    edit that does not fit the file. Files are read and written as UTF-8 bytes, line endings untouched.

        >>> import tempfile; folder = tempfile.TemporaryDirectory(); workdir = Path(folder.name)
        >>> _ = (workdir / "train.py").write_text("lr = 0.1\\n")
        >>> apply_edits(workdir, [Edit(path="train.py", old="0.1", new="0.05"),
        ...                       Edit(path="aug.py", old="", new="FLIP = True\\n")], ["*.py"])
        ['train.py', 'aug.py']
        >>> (workdir / "train.py").read_text()
        'lr = 0.05\\n'
        >>> folder.cleanup()
    """
    workdir = Path(workdir)
    original: dict[str, bytes | None] = {}  # rel -> bytes on disk before, None if the file did not exist
    content: dict[str, str | None] = {}
    for edit in edits:
        rel = check_edit_path(edit.path, editable)
        target = _check_on_disk(workdir, rel)
        if rel not in original:
            original[rel] = _read_for_edit(workdir, rel, target)
            content[rel] = None if original[rel] is None else _decode(rel, original[rel])
        current = content[rel]
        if edit.old == "":
            if current is not None:
                raise EditFailed(
                    f"cannot create {rel}: it already exists; to change it, give the exact text to replace as old"
                )
            content[rel] = edit.new
            continue
        if current is None:
            raise EditFailed(f"cannot edit {rel}: the file does not exist; to create it, give an empty old text")
        count = current.count(edit.old)
        if count == 0:
            raise EditFailed(f"cannot edit {rel}: the old text {_describe(edit.old)} was not found in it")
        if count > 1:
            raise EditFailed(
                f"cannot edit {rel}: the old text {_describe(edit.old)} occurs {count} times; "
                "include more of the surrounding lines so it occurs once"
            )
        content[rel] = current.replace(edit.old, edit.new, 1)

    changed = [rel for rel, text in content.items()
               if text is not None and (original[rel] is None or text.encode("utf-8") != original[rel])]
    written: list[str] = []
    try:
        for rel in changed:
            target = workdir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append(rel)
            target.write_bytes(content[rel].encode("utf-8"))  # type: ignore[union-attr]
    except OSError as exc:
        for rel in written:  # put back what was written: a hypothesis applies whole or not at all
            with contextlib.suppress(OSError):
                if original[rel] is None:
                    (workdir / rel).unlink()
                else:
                    (workdir / rel).write_bytes(original[rel])  # type: ignore[arg-type]
        raise EditFailed(f"cannot write {written[-1] if written else workdir}: {exc}") from exc
    return changed


def _read_for_edit(workdir: Path, rel: str, target: Path) -> bytes | None:
    parent = workdir
    for part in rel.split("/")[:-1]:
        parent = parent / part
        if parent.exists() and not parent.is_dir():
            raise EditFailed(f"cannot edit {rel}: {parent.relative_to(workdir).as_posix()} is a file, not a directory")
    if not target.exists():
        return None
    if not target.is_file():
        raise EditFailed(f"cannot edit {rel}: it is a directory, not a file")
    return target.read_bytes()


def _decode(rel: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EditFailed(f"cannot edit {rel}: it is not UTF-8 text") from exc


def editable_files(
    workdir: Path, editable: Sequence[str], max_bytes_per_file: int = 20_000, max_total_bytes: int = 100_000
) -> dict[str, str]:
    """The text files under ``workdir`` that match the editable globs, by relative path, to show a proposer.

    Files are those git tracks plus untracked ones it does not ignore (every file, ``.git`` aside, when
    ``workdir`` is not in a git work tree), sorted by path; symlinks and binary files are skipped. A file
    over ``max_bytes_per_file`` is cut at a line end with a last line ``[cq: … bytes of PATH left out]``.
    Once the next file would take the total past ``max_total_bytes``, no more are added and a last entry
    under the key ``"[cq: N more files left out]"`` lists their paths, one a line (the first 100; a file
    too big alone for the total is still shown when it comes first).

        >>> import tempfile; folder = tempfile.TemporaryDirectory(); workdir = Path(folder.name)
        >>> _ = (workdir / "train.py").write_text("lr = 0.1\\n" * 3)
        >>> editable_files(workdir, ["*.py"], max_bytes_per_file=20)
        {'train.py': 'lr = 0.1\\nlr = 0.1\\n[cq: 9 more bytes of train.py left out]\\n'}
        >>> folder.cleanup()
    """
    workdir = Path(workdir)
    candidates = [rel for rel in _listed_files(workdir) if glob_matches(rel, editable)]
    return _capped(candidates, lambda rel: _text_of(workdir, rel), max_bytes_per_file, max_total_bytes)


def _capped(candidates: Sequence[str], read, max_bytes_per_file: int, max_total_bytes: int) -> dict[str, str]:
    """``read(path)`` of each candidate (None: left out, e.g. binary), cut as :func:`editable_files` says."""
    files: dict[str, str] = {}
    total = 0
    for index, rel in enumerate(candidates):
        text = read(rel)
        if text is None:
            continue
        data = text.encode("utf-8")
        if len(data) > max_bytes_per_file:
            kept = data[:max_bytes_per_file]
            if b"\n" in kept:
                kept = kept[: kept.rindex(b"\n") + 1]
            text = kept.decode("utf-8", errors="ignore")
            text += ("" if text.endswith("\n") or not text else "\n")
            text += f"[cq: {len(data) - len(kept)} more bytes of {rel} left out]\n"
        size = len(text.encode("utf-8"))
        if files and total + size > max_total_bytes:
            rest = candidates[index:]
            listed = "".join(f"{r}\n" for r in rest[:100]) + (f"… {len(rest) - 100} more\n" if len(rest) > 100 else "")
            files[f"[cq: {len(rest)} more files left out]"] = listed
            break
        files[rel] = text
        total += size
    return files


def _listed_files(workdir: Path) -> list[str]:
    listed = _git_maybe(workdir, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if listed is None:
        names = []
        for folder, dirs, filenames in os.walk(workdir):
            dirs[:] = sorted(d for d in dirs if d != ".git")
            names += [(Path(folder) / name).relative_to(workdir).as_posix() for name in filenames]
        return sorted(names)
    return sorted({name for name in listed.split("\0") if name})


def _text_of(workdir: Path, rel: str) -> str | None:
    path = workdir / rel
    try:
        _check_on_disk(workdir, rel)
    except EditRejected:
        return None
    if not path.is_file():
        return None
    return _text(path.read_bytes())


def _text(data: bytes) -> str | None:
    """The bytes of a file as text; None for a binary (or not UTF-8) file."""
    if b"\0" in data[:8000]:  # git's own test for a binary file
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ------------------------------------------------------------------------------------------------------- git


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARS}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_OPTIONAL_LOCKS"] = "0"  # reads (status, diff) must not take the user's index lock
    return env


def _run_git(cwd: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["git", *args], check=False, cwd=cwd, input=stdin, capture_output=True, text=True, env=env or _git_env(),
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        if shutil.which("git") is None:
            raise BadInput("git is not installed; code edits need it: install git (e.g. apt-get install git)") from exc
        raise BadInput(f"{cwd} does not exist") from exc


def _git(cwd: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    """git's stdout, or :class:`GitError` with what it said."""
    done = _run_git(cwd, *args, stdin=stdin, env=env)
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise GitError(f"git {' '.join(args)} failed in {cwd} (exit {done.returncode}): {' / '.join(said[-5:])}")
    return done.stdout


def _git_maybe(cwd: Path, *args: str) -> str | None:
    """git's stdout, or None when it exits non-zero (a question whose answer is no)."""
    done = _run_git(cwd, *args)
    return done.stdout if done.returncode == 0 else None


def _identity(cwd: Path) -> tuple[str, ...]:
    # A fresh container or CI host often has no identity; a commit would then stop the loop with
    # "Please tell me who you are". The user's own identity wins when there is one.
    email = _git_maybe(cwd, "config", "user.email")
    return () if (email or "").strip() else _FALLBACK_IDENTITY


def _commit_of(cwd: Path, rev: str) -> str | None:
    out = _git_maybe(cwd, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    return out.strip() if out else None


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    # flock on a fresh file description: excludes other processes and other threads of this one alike.
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name or name.endswith((".lock", ".")):
        raise BadInput(
            f"{kind} {name!r} cannot name a git branch cq/<loop>/<exp-id>: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (at most 100), e.g. pose-mpjpe"
        )
    return name


def _dirty_files(cwd: Path) -> list[str]:
    """Tracked files with staged or unstaged changes, and untracked files git does not ignore, under ``cwd``."""
    changed = _git(cwd, "diff", "HEAD", "--name-only", "-z", "--no-renames", "--relative")
    untracked = _git(cwd, "ls-files", "-z", "--others", "--exclude-standard")
    return sorted({name for name in (changed + untracked).split("\0") if name})


def _worktrees(cwd: Path) -> list[dict[str, str]]:
    """``git worktree list --porcelain`` as dicts: worktree (its path), HEAD, branch (a full ref), …"""
    entries: list[dict[str, str]] = []
    for block in _git(cwd, "worktree", "list", "--porcelain").split("\n\n"):
        entry: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(" ")
            if key:
                entry[key] = value
        if "worktree" in entry:
            entries.append(entry)
    return entries


def _registered(cwd: Path, path: Path) -> bool:
    return any(Path(entry["worktree"]).resolve() == path.resolve() for entry in _worktrees(cwd))


def _drop_worktree(repo: Path, path: Path) -> None:
    """Remove the worktree at ``path`` (a folder of ours) with whatever is in it; no error if it is gone."""
    if _registered(repo, path):
        # --force twice: also when it holds outputs or is locked.
        _run_git(repo, "worktree", "remove", "--force", "--force", str(path))
    if path.exists():
        shutil.rmtree(path)
    if _registered(repo, path):
        # Only now, with its folder gone: prune drops every registration whose folder is missing.
        _run_git(repo, "worktree", "prune")


def workdir_at_commit(workdir: Path, commit: str) -> bool:
    """Whether ``workdir`` is inside a git work tree whose HEAD is ``commit`` (a sha, full or abbreviated).

    A worker on the loop's own host uses the loop's worktree when this holds, instead of :func:`checkout_at`.

        >>> workdir_at_commit(Path("/"), "5d1c0e7")
        False
    """
    workdir = Path(workdir)
    if not workdir.is_dir() or shutil.which("git") is None:
        return False
    head = _commit_of(workdir, "HEAD")
    return head is not None and head == _commit_of(workdir, commit)


# --------------------------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Checkout:
    """An experiment's code: its branch and commit, and the workdir to run it in (inside the worktree)."""

    branch: str
    commit: str
    workdir: Path
    changed: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoopRepo:
    """Git branches and worktrees of one research loop.

    Branches are ``cq/<loop>/<exp_id>`` and ``cq/<loop>/best``; worktrees live in
    ``<git-common-dir>/cq-worktrees/<loop>/<exp_id>``. Make one with :meth:`open`; it is a plain value
    (it pickles), and every method asks git afresh, so two processes may hold one for the same loop.
    """

    root: Path
    subdir: str
    loop: str
    editable: tuple[str, ...]
    start_branch: str | None
    start_commit: str
    common_dir: Path

    @classmethod
    def open(cls, workdir: str | Path, loop: str, editable: Sequence[str]) -> LoopRepo:
        """The loop's view of the git repository holding ``workdir``; :class:`BadInput` naming the fix if
        code edits cannot work there (no git, no repository, no commit, editable files with changes).

            >>> LoopRepo.open("examples/pose", "pose", ["*.py"]).branch("exp-3")   # doctest: +SKIP
            'cq/pose/exp-3'
        """
        _check_name("loop name", loop)
        for pattern in editable:
            normalised, why = _normalise(pattern.rstrip("/") or pattern)
            if normalised is None:
                raise BadInput(f"editable glob {pattern!r} is invalid: {why}; e.g. 'src/**/*.py'")
        if shutil.which("git") is None:
            raise BadInput("git is not installed; code edits need it: install git (e.g. apt-get install git)")
        workdir = Path(workdir).expanduser().absolute()
        if not workdir.is_dir():
            raise BadInput(f"workdir {workdir} does not exist or is not a directory")
        top = _git_maybe(workdir, "rev-parse", "--show-toplevel")
        if not top or not top.strip():
            raise BadInput(
                f"{workdir} is not a git repository; code edits need one: "
                f"cd {workdir} && git init && git add -A && git commit -m baseline"
            )
        root = Path(top.strip()).resolve()
        subdir = Path(os.path.realpath(workdir)).relative_to(root).as_posix()
        subdir = "" if subdir == "." else subdir
        head = _commit_of(workdir, "HEAD")
        if head is None:
            raise BadInput(
                f"the git repository {root} has no commit yet; code edits start from one: "
                f"cd {root} && git add -A && git commit -m baseline"
            )
        dirty = [name for name in _dirty_files(workdir) if glob_matches(name, editable)]
        if dirty:
            shown = ", ".join(dirty[:10]) + (f" and {len(dirty) - 10} more" if len(dirty) > 10 else "")
            raise BadInput(
                f"editable files in {workdir} have uncommitted changes: {shown}; the loop's experiments start "
                "from the last commit and would run without them: commit them (git add -A && git commit) "
                "or stash them (git stash -u), then start the loop again"
            )
        branch = _git_maybe(workdir, "symbolic-ref", "--quiet", "--short", "HEAD")
        common = Path(_git(workdir, "rev-parse", "--git-common-dir").strip())
        return cls(
            root=root,
            subdir=subdir,
            loop=loop,
            editable=tuple(editable),
            start_branch=branch.strip() if branch and branch.strip() else None,
            start_commit=head,
            common_dir=(workdir / common).resolve(),
        )

    # -- names

    def branch(self, exp_id: str) -> str:
        """The experiment's branch, ``cq/<loop>/<exp_id>``."""
        return f"cq/{self.loop}/{_check_name('exp id', exp_id)}"

    @property
    def best_branch(self) -> str:
        """The branch of the best experiment so far, ``cq/<loop>/best``."""
        return f"cq/{self.loop}/best"

    def worktree(self, exp_id: str) -> Path:
        """Where the experiment's worktree lives (its top level; the workdir is ``worktree / subdir``)."""
        return self.common_dir / "cq-worktrees" / self.loop / _check_name("exp id", exp_id)

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return _locked(self.common_dir / "cq-worktrees" / ".lock")

    def _trailer(self, exp_id: str) -> str:
        return f"cq-loop: {self.loop} {exp_id}"

    def _resolve(self, rev: str) -> str:
        commit = _commit_of(self.root, rev)
        if commit is None:
            raise BadInput(f"{rev!r} is no commit of the git repository {self.root}")
        return commit

    # -- experiments

    def prepare(self, exp_id: str, base: str, hypothesis: Hypothesis) -> Checkout:
        """The experiment's worktree on ``cq/<loop>/<exp_id>`` at ``base``, with the hypothesis's edits committed.

        Idempotent: when the branch already holds this experiment's commit on top of ``base`` (or is ``base``
        itself, for a hypothesis without edits) it is reused as it is. Otherwise the branch is (re)made from
        ``base`` in a fresh worktree. If an edit is rejected or fails, the worktree and branch are removed
        and the error is raised: nothing is left half-made.

            >>> repo.prepare("exp-7", repo.best_branch, hypothesis).changed      # doctest: +SKIP
            ('model.py',)
        """
        branch = self.branch(exp_id)
        base_commit = self._resolve(base)
        path = self.worktree(exp_id)
        with self._lock():
            tip = _commit_of(self.root, f"refs/heads/{branch}")
            if tip is not None and self._is_prepared(exp_id, tip, base_commit, hypothesis):
                if not self._worktree_on(path, branch, tip):
                    self._drop_worktree(path)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _git(self.root, "worktree", "add", str(path), branch)
                return Checkout(branch, tip, path / self.subdir, self._changed(path, base_commit, tip))
            self._drop_worktree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                _git(self.root, "worktree", "add", "-B", branch, str(path), base_commit)
                commit, changed = base_commit, ()
                if hypothesis.edits:
                    changed = tuple(apply_edits(path / self.subdir, hypothesis.edits, self.editable))
                    if changed:
                        commit = self._commit(path, exp_id, hypothesis, changed)
            except BaseException:
                self._drop_worktree(path)
                _run_git(self.root, "branch", "-D", branch)
                raise
        return Checkout(branch, commit, path / self.subdir, changed)

    def _is_prepared(self, exp_id: str, tip: str, base: str, hypothesis: Hypothesis) -> bool:
        if not hypothesis.edits:
            return tip == base
        # A branch left at base by an earlier attempt with edits may have died before its commit: redo it.
        if tip == base or _commit_of(self.root, f"{tip}^") != base:
            return False
        return self._trailer(exp_id) in _git(self.root, "log", "-1", "--format=%B", tip).splitlines()

    def _worktree_on(self, path: Path, branch: str, commit: str) -> bool:
        if not path.is_dir():
            return False
        for entry in _worktrees(self.root):
            if Path(entry["worktree"]).resolve() == path.resolve():
                return entry.get("branch") == f"refs/heads/{branch}" and entry.get("HEAD") == commit
        return False

    def _drop_worktree(self, path: Path) -> None:
        _drop_worktree(self.root, path)

    def _commit(self, path: Path, exp_id: str, hypothesis: Hypothesis, changed: Sequence[str]) -> str:
        cwd = path / self.subdir
        env = {**_git_env(), "GIT_LITERAL_PATHSPECS": "1"}
        # -f: a file the hypothesis created deliberately is committed even if a .gitignore pattern covers it.
        _git(cwd, "add", "-f", "--", *changed, env=env)
        title = " ".join(hypothesis.title.split())
        rationale = hypothesis.rationale.strip()
        message = f"{title}\n\n{rationale}\n\n{self._trailer(exp_id)}\n" if rationale else (
            f"{title}\n\n{self._trailer(exp_id)}\n"
        )
        # --cleanup=whitespace keeps a rationale's '#' lines (markdown); hooks and signing are skipped (module doc).
        _git(cwd, *_identity(self.root), "-c", "commit.gpgsign=false", "commit", "--no-verify",
             "--cleanup=whitespace", "-F", "-", stdin=message, env=env)
        return _git(cwd, "rev-parse", "HEAD").strip()

    def _changed(self, path: Path, base: str, tip: str) -> tuple[str, ...]:
        if base == tip:
            return ()
        out = _git(path / self.subdir, "diff", "--name-only", "-z", "--no-renames", "--relative", base, tip)
        return tuple(name for name in out.split("\0") if name)

    def remove_worktree(self, exp_id: str) -> None:
        """Remove the experiment's worktree (its outputs in it too); its branch stays. No error if it is gone."""
        with self._lock():
            self._drop_worktree(self.worktree(exp_id))

    # -- the best so far

    def set_best(self, commit: str) -> None:
        """Point ``cq/<loop>/best`` at ``commit`` (creating it); the user's checkout is not touched.

            >>> repo.set_best(checkout.commit)          # doctest: +SKIP
        """
        sha = self._resolve(commit)
        with self._lock():
            # `git branch -f` refuses to move a branch someone has checked out; update-ref would not.
            _git(self.root, "branch", "--no-track", "-f", self.best_branch, sha)

    def merge_best(self) -> str:
        """Merge ``cq/<loop>/best`` into the branch the loop started on; the branch's new commit.

        A fast-forward when the start branch has not moved, else a merge commit ``Merge cq/<loop>/best (…)``
        computed without touching any checkout (so a conflict leaves nothing behind: :class:`BadInput`
        names the files). Where the start branch is checked out, that checkout fast-forwards to the result,
        after checking no file it would change has uncommitted changes; elsewhere only the ref moves.

            >>> repo.merge_best()                       # doctest: +SKIP
            '8f2a41c…'
        """
        if self.start_branch is None:
            raise BadInput(
                f"the loop started on a detached HEAD ({self.start_commit[:12]}), so there is no branch to merge "
                f"{self.best_branch} into: git checkout -b NAME && git merge {self.best_branch}"
            )
        best = _commit_of(self.root, f"refs/heads/{self.best_branch}")
        if best is None:
            raise BadInput(f"{self.best_branch} does not exist yet: no experiment of loop {self.loop} was kept")
        ref = f"refs/heads/{self.start_branch}"
        with self._lock():
            target = _commit_of(self.root, ref)
            if target is None:
                raise BadInput(
                    f"branch {self.start_branch} no longer exists; merge by hand: git merge {self.best_branch}"
                )
            if _run_git(self.root, "merge-base", "--is-ancestor", best, target).returncode == 0:
                return target  # already in
            fast_forward = _run_git(self.root, "merge-base", "--is-ancestor", target, best).returncode == 0
            result = best if fast_forward else self._merge_commit(target, best)
            checked_out = [Path(e["worktree"]) for e in _worktrees(self.root) if e.get("branch") == ref]
            if not checked_out:
                _git(self.root, "update-ref", "-m", f"cq: merge {self.best_branch}", ref, result, target)
                return result
            checkout = checked_out[0]
            touched = set(_names(_git(checkout, "diff", "--name-only", "-z", "--no-renames", "--no-relative",
                                      target, result)))
            dirty = [name for name in _dirty_files(checkout) if name in touched]  # both relative to its top
            if dirty:
                raise BadInput(
                    f"merging {self.best_branch} into {self.start_branch} would change files with uncommitted "
                    f"changes in {checkout}: {', '.join(dirty)}; commit or stash them (git stash -u), "
                    f"then merge again (cq loop merge, or git merge {self.best_branch})"
                )
            _git(checkout, "merge", "--ff-only", "--no-edit", result)
            return result

    def _merge_commit(self, target: str, best: str) -> str:
        done = _run_git(self.root, "merge-tree", "--write-tree", "--name-only", "--no-messages", target, best)
        if done.returncode == 1:
            conflicts = [line for line in done.stdout.splitlines()[1:] if line]
            raise BadInput(
                f"{self.best_branch} conflicts with {self.start_branch} in {', '.join(conflicts) or 'some files'}; "
                f"merge by hand: git merge {self.best_branch}, resolve the conflicts, git commit"
            )
        if done.returncode != 0:
            raise GitError(
                f"git merge-tree --write-tree failed ({done.stderr.strip()}); it needs git 2.38 or newer. "
                f"Merge by hand: git merge {self.best_branch}"
            )
        tree = done.stdout.splitlines()[0].strip()
        base = _git(self.root, "merge-base", target, best).split()[0]
        subjects = _git(self.root, "log", "--first-parent", "--format=%s", f"{base}..{best}").splitlines()
        shown = "; ".join(subjects[:5]) + ("; …" if len(subjects) > 5 else "")
        count = f"{len(subjects)} commit{'s' if len(subjects) != 1 else ''}"
        message = f"Merge {self.best_branch} ({count}: {shown})\n\ncq-loop: {self.loop} best\n"
        return _git(self.root, *_identity(self.root), "commit-tree", tree, "-p", target, "-p", best, "-F", "-",
                    stdin=message).strip()

    # -- housekeeping

    def prune(self, keep: Iterable[str] = ()) -> list[str]:
        """Delete this loop's experiment branches and worktrees except ``best`` and the exp ids in ``keep``;
        the deleted branch names. Other loops' branches are never touched, nor a branch someone has checked
        out outside the loop's worktrees.

            >>> repo.prune(keep=["exp-7"])              # doctest: +SKIP
            ['cq/pose/exp-3', 'cq/pose/exp-5']
        """
        keep = set(keep) | {"best"}
        prefix = f"refs/heads/cq/{self.loop}/"
        deleted: list[str] = []
        with self._lock():
            worktrees = _worktrees(self.root)
            refs = _git(self.root, "for-each-ref", "--format=%(refname)", prefix.rstrip("/")).split()
            for ref in refs:
                if not ref.startswith(prefix):
                    continue
                exp_id = ref[len(prefix):]
                if exp_id in keep:
                    continue
                ours = self.common_dir / "cq-worktrees" / self.loop / exp_id
                elsewhere = [e for e in worktrees if e.get("branch") == ref
                             and Path(e["worktree"]).resolve() != ours.resolve()]
                if elsewhere:
                    continue
                self._drop_worktree(ours)
                _git(self.root, "branch", "-D", ref[len("refs/heads/"):])
                deleted.append(ref[len("refs/heads/"):])
            folder = self.common_dir / "cq-worktrees" / self.loop
            if folder.is_dir():  # worktrees whose branch is already gone
                for path in folder.iterdir():
                    if path.name not in keep and not _commit_of(self.root, f"{prefix}{path.name}"):
                        self._drop_worktree(path)
        return deleted

    def files_at(self, commit: str, max_bytes: int = 20_000, max_total_bytes: int = 100_000) -> dict[str, str]:
        """The editable files of the workdir at ``commit``, read from git (no checkout needed), each cut at
        ``max_bytes`` and all together at ``max_total_bytes`` as :func:`editable_files` cuts them (binary and
        non-UTF-8 files left out).

            >>> repo.files_at(repo.start_commit)        # doctest: +SKIP
            {'model.py': 'GAIN = 0.0\\n'}
        """
        prefix = f"{self.subdir}/" if self.subdir else ""
        listing = _git(self.root, "ls-tree", "-r", "-z", "--name-only", commit, "--", self.subdir or ".")
        names = {(name[len(prefix):] if prefix and name.startswith(prefix) else name): name
                 for name in listing.split("\0") if name}

        def read(relative: str) -> str | None:
            return _text(subprocess.run(["git", "-C", str(self.root), "show", f"{commit}:{names[relative]}"],
                                        capture_output=True, check=False, env=_git_env()).stdout)

        candidates = sorted(relative for relative in names if glob_matches(relative, self.editable))
        return _capped(candidates, read, max_bytes, max_total_bytes)

    def remote_url(self, remote: str) -> str:
        """The URL of ``remote`` (a remote name, or already a URL or path)."""
        if "/" in remote or ":" in remote:
            return remote
        url = (_git_maybe(self.root, "remote", "get-url", remote) or "").strip()
        if not url:
            raise BadInput(f"code.remote: the repository {self.root} has no remote {remote!r}; add it (git remote add "
                           f"{remote} URL) or give the URL")
        return url

    def push(self, remote: str, *branches: str) -> None:
        """Force-push ``branches`` (e.g. ``cq/pose/exp-7``) to ``remote`` (a remote name or URL), for workers
        on other hosts to fetch with :func:`checkout_at`. Nothing to push is no error.

            >>> repo.push("origin", repo.branch("exp-7"), repo.best_branch)   # doctest: +SKIP
        """
        if not branches:
            return
        specs = [f"refs/heads/{name}:refs/heads/{name}" for name in branches]
        done = _run_git(self.root, "push", "--force", "--quiet", remote, *specs)
        if done.returncode != 0:
            raise GitError(
                f"git push to {remote} failed: {done.stderr.strip()}; check that workers' remote is reachable "
                f"and writable from here: git ls-remote {remote}"
            )


def _names(out: str) -> list[str]:
    return [name for name in out.split("\0") if name]


# ------------------------------------------------------------------------------------------------ remote workers


def _normal_url(url: str) -> str:
    # A local path is fetched from the mirror's folder: make it absolute. scp-like `host:path` stays as is.
    if "://" in url or re.match(r"^[^/]+:", url):
        return url
    return str(Path(url).expanduser().absolute())


def checkout_at(url: str, commit: str, subdir: str, cache_dir: Path) -> Path:
    """The workdir ``subdir`` of ``commit`` of the repository ``url``, checked out under ``cache_dir``.

    For a worker on another host: one bare mirror per URL (``cache_dir/mirrors/<hash>.git``) fetches all
    branches when the commit is missing; each commit gets a detached worktree ``cache_dir/commits/<sha>``,
    reused while it is at that commit (experiments at one commit share it). A file lock makes concurrent
    calls safe. :class:`~cq_prefect.errors.CqError` when the commit cannot be found.

        >>> checkout_at("git@host:proj.git", "5d1c0e7…", "examples/pose", Path("/var/cache/cq"))   # doctest: +SKIP
        PosixPath('/var/cache/cq/commits/5d1c0e7…/examples/pose')
    """
    if not _HEX.fullmatch(commit):
        raise BadInput(f"commit {commit!r} is not a git commit id (hex, e.g. 5d1c0e7)")
    subdir_norm, why = _normalise(subdir) if subdir not in ("", ".") else ("", "")
    if subdir_norm is None:
        raise BadInput(f"subdir {subdir!r} is invalid: {why}")
    if shutil.which("git") is None:
        raise BadInput("git is not installed; workers need it to check out a loop's code: install git")
    cache_dir = Path(cache_dir).expanduser().absolute()
    url = _normal_url(url)
    mirror = cache_dir / "mirrors" / f"{hashlib.sha256(url.encode()).hexdigest()[:20]}.git"
    with _locked(cache_dir / ".lock"):
        if not (mirror / "HEAD").exists():
            if mirror.exists():
                shutil.rmtree(mirror)  # a mirror whose creation was interrupted
            mirror.mkdir(parents=True)
            _git(mirror, "init", "--quiet", "--bare")
            _git(mirror, "config", "cq.url", url)
        sha = _commit_of(mirror, commit)
        if sha is None:
            done = _run_git(mirror, "fetch", "--quiet", "--no-tags", url, "+refs/heads/*:refs/heads/*")
            if done.returncode != 0:
                raise CqError(
                    f"cannot fetch {url}: {done.stderr.strip()}; check the URL and access: git ls-remote {url}"
                )
            sha = _commit_of(mirror, commit)
        if sha is None:
            raise CqError(
                f"commit {commit} not found in {url}; was the branch pushed? (the loop pushes its cq/… branches "
                "to the workers' remote)"
            )
        dest = cache_dir / "commits" / sha
        if not ((dest / ".git").is_file() and _commit_of(dest, "HEAD") == sha):
            _drop_worktree(mirror, dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            _git(mirror, "worktree", "add", "--detach", "--quiet", str(dest), sha)
    workdir = dest / subdir_norm if subdir_norm else dest
    if not workdir.is_dir():
        raise CqError(f"{subdir} does not exist at commit {sha[:12]} of {url}; check the loop's workdir")
    return workdir
