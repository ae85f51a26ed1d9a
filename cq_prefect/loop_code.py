"""The code side of a research loop whose hypotheses edit files (``code: {editable: […]}`` in its config).

    >>> code = LoopCode.open(config)                                    # doctest: +SKIP
    >>> prepared = code.prepare("exp-044", hypothesis, history)         # doctest: +SKIP
    >>> prepared.branch, prepared.source.commit[:7]                     # doctest: +SKIP
    ('cq/pose-demo/exp-044', '5d1c0e7')

Every experiment of such a loop runs at its own commit on branch ``cq/<loop>/<exp-id>``, made from the best
commit so far (the commit of the kept experiment with the best value, or the commit the loop started from),
with the hypothesis's edits committed on top (message: its title and rationale). Local workers run it in the
branch's worktree; workers on other hosts check the commit out themselves from ``code.remote`` (pushed to
before the run) or the repository's path (:class:`~cq_prefect.spec.GitSource`). Files git does not hold
(ignored data folders, say) are linked into each worktree from the workdir, so the command finds them as
before. A kept experiment moves ``cq/<loop>/best``; the worktrees of the others are removed at once (their
branches stay, for inspection, unless ``prune_branches``). When the loop ends, the best branch is named in
the ledger and the report, and with ``merge`` it is merged into the branch the loop started from.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cq_prefect.code_changes import Checkout, LoopRepo
from cq_prefect.errors import BadInput
from cq_prefect.records import ExperimentRecord, Hypothesis
from cq_prefect.spec import GitSource

log = logging.getLogger(__name__)

MAX_TOTAL_FILE_BYTES = 100_000  # all editable files shown to Claude together


@dataclass(frozen=True)
class Prepared:
    """An experiment's code, ready to run: where, at which commit, on which branch."""

    checkout: Checkout
    source: GitSource

    @property
    def branch(self) -> str:
        return self.checkout.branch

    @property
    def commit(self) -> str:
        return self.checkout.commit


@dataclass(frozen=True)
class LoopCode:
    """A code loop's repository and settings (see the module docstring)."""

    repo: LoopRepo
    settings: Any  # loop_config.CodeSettings
    url: str  # where workers on other hosts fetch the commits
    best: Callable[[Sequence[ExperimentRecord]], ExperimentRecord | None]  # the loop's LoopConfig.best

    @classmethod
    def open(cls, config: Any, start: Mapping[str, str] | None = None) -> LoopCode | None:
        """The code side of ``config`` (None when it edits no code); BadInput, before anything is created, when
        its workdir is not a git repository or its editable files have uncommitted changes. ``start``: the
        start branch and commit a resumed loop recorded (``{"branch": …, "commit": …}``)."""
        settings = config.code
        if settings is None:
            return None
        repo = LoopRepo.open(config.experiment.workdir, config.name, settings.editable)
        if start and start.get("commit"):
            repo = dataclasses.replace(repo, start_branch=start.get("branch") or None, start_commit=start["commit"])
        return cls(repo, settings, repo.remote_url(settings.remote) if settings.remote else str(repo.root),
                   config.best)

    # -- experiments -------------------------------------------------------------------------------------

    def base_commit(self, history: Sequence[ExperimentRecord]) -> str:
        """The commit new experiments build on: the best kept experiment's, else where the loop started.

        The best, not the last: with experiments side by side, a later slot may finish (and be kept) before an
        earlier one that beats it, and the history is in the order they started."""
        best = self.best([record for record in history if record.outcome == "kept" and record.commit])
        return best.commit if best is not None else self.repo.start_commit

    def prepare(self, exp_id: str, hypothesis: Hypothesis, history: Sequence[ExperimentRecord]) -> Prepared:
        """The experiment's branch and worktree at the best commit plus its edits (EditFailed / EditRejected
        when they cannot be applied: nothing is left behind)."""
        checkout = self.repo.prepare(exp_id, self.base_commit(history), hypothesis)
        _link_untracked(Path(self.repo.root) / self.repo.subdir, checkout.workdir)
        if self.settings.remote:
            self.repo.push(self.settings.remote, checkout.branch)
        return Prepared(checkout, GitSource(url=self.url, commit=checkout.commit, subdir=self.repo.subdir))

    def files(self, history: Sequence[ExperimentRecord]) -> dict[str, str]:
        """The editable files at the best commit (what Claude reads), each capped at ``max_file_bytes``."""
        return self.repo.files_at(self.base_commit(history), self.settings.max_file_bytes, MAX_TOTAL_FILE_BYTES)

    def recorded(self, record: ExperimentRecord) -> None:
        """After an experiment's outcome: a kept one becomes the best branch; the others' worktrees go."""
        if not record.commit:
            return
        if record.outcome == "kept":
            self.repo.set_best(record.commit)
        else:
            self.repo.remove_worktree(record.exp_id)

    # -- the end ------------------------------------------------------------------------------------------

    def finish(self, history: Sequence[ExperimentRecord]) -> dict[str, str]:
        """Name the best branch, merge it (``merge``), prune the others (``prune_branches``), remove worktrees.

        Returns what to record: ``best_branch`` (and ``best_commit``), ``merged`` (the start branch's new
        commit) or ``merge_error``, ``pruned`` (how many branches were deleted)."""
        out: dict[str, str] = {}
        best = self.base_commit(history)
        self.repo.set_best(best)
        out.update(best_branch=self.repo.best_branch, best_commit=best)
        if self.settings.merge:
            if best == self.repo.start_commit:
                out["merged"] = ""  # nothing was kept: nothing to merge
            else:
                try:
                    out["merged"] = self.repo.merge_best()
                except BadInput as exc:  # a conflict or uncommitted changes: the loop's results stand
                    out["merge_error"] = str(exc)
        if self.settings.prune_branches:
            kept = {r.exp_id for r in history if r.outcome == "kept"}
            out["pruned"] = str(len(self.repo.prune(keep=kept)))
        for record in history:
            if record.commit:
                self.repo.remove_worktree(record.exp_id)
        return out


def _link_untracked(source: Path, workdir: Path) -> None:
    """Link what the workdir has and the worktree lacks (data folders git ignores) into the worktree."""
    try:
        names = os.listdir(source)
    except OSError:
        return
    for name in names:
        if name == ".git":
            continue
        target = workdir / name
        if not target.exists() and not target.is_symlink():
            try:
                target.symlink_to(source / name)
            except OSError as exc:
                log.warning("could not link %s into %s: %s", name, workdir, exc)
