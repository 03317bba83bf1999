"""The kill test: a 2-cell, 2-batch run and a report, each stopped once at every atomic write they make.

Every file the suite writes goes through a temporary file renamed into place (`os.replace` in
adadiff_bench.results): the k-th rename is where the process "dies", for k = 1..K, K counted on an
uninterrupted pass. A kill leaves what a real one leaves: the temporary of the write it interrupted (nothing is
cleaned up after it) under a process id that no longer runs, the lock released. The same command then runs
again, and must end with exactly the uninterrupted result and no stray file.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from adadiff_bench import results
from adadiff_bench.checkpoints import build_model, save_checkpoint
from adadiff_bench.cli import main
from conftest import TINY
from test_errors import run_args, small_digits
from test_hostile_files import DEAD_PID, RESUME_SAMPLING, assert_same_run


class Killed(BaseException):
    """The process dies here (a BaseException: nothing in the suite catches it, as nothing survives SIGKILL)."""


class OsKilledAtRename:
    """`os` for adadiff_bench.results: counts the renames into place; the `kill_at`-th one dies before renaming.
    After the death nothing is deleted (the temporary stays), and the temporaries carry a dead process's id."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at, self.renames, self.killed = kill_at, [], False

    def replace(self, source, target):
        self.renames.append(Path(target).name)
        if len(self.renames) == self.kill_at:
            self.killed = True
            raise Killed(target)
        return os.replace(source, target)

    def unlink(self, path, *args, **kwargs):
        if not self.killed:
            os.unlink(path, *args, **kwargs)

    def getpid(self) -> int:
        return DEAD_PID

    def __getattr__(self, name):
        return getattr(os, name)


def killed_at(monkeypatch, kill_at: int | None, command: list[str]) -> OsKilledAtRename:
    """Run `command` with the kill at rename `kill_at` (None: count the renames of a whole pass)."""
    fake = OsKilledAtRename(kill_at)
    monkeypatch.setattr(results, "os", fake)
    try:
        if kill_at is None:
            assert main(command) == 0
        else:
            with pytest.raises(Killed):
                main(command)
    finally:
        monkeypatch.setattr(results, "os", os)
    return fake


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, build_model(TINY).eval(), TINY)
    return path


def run_command(folder: Path, checkpoint: Path) -> list[str]:
    """One thread: tiny tensors run fastest on one, and immune to other processes' load."""
    return run_args(folder, checkpoint, sampling=RESUME_SAMPLING, data=small_digits(folder),
                    timing="enabled = false\nthreads = 1")


def test_a_run_killed_at_each_write_resumes_to_the_uninterrupted_result(tmp_path, checkpoint, monkeypatch, capsys):
    reference = tmp_path / "reference"
    reference.mkdir()
    renames = killed_at(monkeypatch, None, run_command(reference, checkpoint)).renames
    # 2 cells x (2 batches, samples, exits, row) + config.json + results.csv, exits.npz, run.json + the final
    # rename, and the reference statistics cache
    assert renames.count("row.json") == 2 and sum(name.startswith("batch_") for name in renames) == 4
    assert len(renames) >= 15
    for k in range(1, len(renames) + 1):
        folder = tmp_path / f"kill{k}"
        folder.mkdir()
        command = run_command(folder, checkpoint)
        killed_at(monkeypatch, k, command)
        left = list((folder / "results").rglob("*.tmp"))
        assert left or renames[k - 1] == "tiny", f"the kill at rename {k} left no temporary: the test kills nothing"
        assert main(command) == 0, f"killed at rename {k} ({renames[k - 1]}): {capsys.readouterr().err}"
        assert_same_run(folder / "results" / "tiny", reference / "results" / "tiny")
        assert not list((folder / "results").rglob("*.tmp")), f"killed at rename {k} ({renames[k - 1]})"
        shutil.rmtree(folder)
    capsys.readouterr()


def test_an_overwrite_killed_at_each_write_reruns_to_the_uninterrupted_result(tmp_path, checkpoint, monkeypatch,
                                                                               capsys):
    """`run --overwrite` over a finished run, killed at each rename, the last two included (the old run set aside
    as results/.tiny.old, then the new one moved into place), then run again: the new run, and no .old left."""
    reference = tmp_path / "reference"
    reference.mkdir()
    assert main(run_command(reference, checkpoint)) == 0
    folder = tmp_path / "overwritten"
    folder.mkdir()
    command = run_command(folder, checkpoint)
    assert main(command) == 0
    saved = tmp_path / "saved"
    shutil.copytree(folder / "results", saved)
    renames = killed_at(monkeypatch, None, command + ["--overwrite"]).renames
    assert renames[-2:] == [".tiny.old", "tiny"]
    for k in range(1, len(renames) + 1):
        killed_at(monkeypatch, k, command + ["--overwrite"])
        assert main(command + ["--overwrite"]) == 0, f"killed at rename {k} ({renames[k - 1]})"
        assert_same_run(folder / "results" / "tiny", reference / "results" / "tiny")
        shutil.rmtree(folder / "results")
        shutil.copytree(saved, folder / "results")
    capsys.readouterr()


def report_files(out: Path) -> dict[str, bytes]:
    """Every file of a report but the PDFs (which carry their creation time)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.suffix != ".pdf"}


def test_a_report_killed_at_each_write_reruns_to_the_uninterrupted_report(tmp_path, checkpoint, monkeypatch,
                                                                           capsys):
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    assert main(run_command(run_folder, checkpoint)) == 0
    run = run_folder / "results" / "tiny"
    reference = tmp_path / "reference-report"
    renames = killed_at(monkeypatch, None, ["report", str(run), "--out", str(reference)]).renames
    assert {"leaderboard.md", "index.html", "fid_vs_gflops.png"} <= set(renames)
    expected = report_files(reference)
    for k in range(1, len(renames) + 1):
        out = tmp_path / f"report{k}"
        killed_at(monkeypatch, k, ["report", str(run), "--out", str(out)])
        assert list(out.rglob("*.tmp")), f"the kill at rename {k} left no temporary: the test kills nothing"
        assert main(["report", str(run), "--out", str(out)]) == 0
        assert report_files(out) == expected, f"killed at rename {k} ({renames[k - 1]})"
        assert not list(out.rglob("*.tmp")), f"killed at rename {k} ({renames[k - 1]})"
        shutil.rmtree(out)
    capsys.readouterr()
