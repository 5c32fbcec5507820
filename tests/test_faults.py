"""Kills at every step of a folder replacement (fault injection at each of fsutil's steps, not
timing), with and without the atomic exchange, and the two-run race for one run directory made
deterministic: the old or the new folder always survives, and a refused run removes nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_user_error, run_cli
from llamaforge import fsutil
from llamaforge.errors import UserError
from llamaforge.runs import lock_run, resolve_model

STEPS = ["filled", "exchanged", "old_moved", "new_moved", "done"]
OLD, NEW = {"config.json": "{}", "a.txt": "old", "b.txt": "old"}, {"config.json": "{}", "a.txt": "new", "b.txt": "new"}


def _fill(folder: Path, files: dict) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)


def replace_and_die_at(out: Path, step: str, atomic_exchange: bool) -> int:
    """In a forked child: replace `out` with NEW, SIGKILL-like exit (os._exit) at `step`."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            fsutil._step = lambda name: os._exit(9) if name == step else None
            if not atomic_exchange:
                fsutil.exchange = lambda a, b: False
            with fsutil.atomic_folder(out) as tmp:
                _fill(tmp, NEW)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def contents(folder: Path) -> dict:
    return {p.name: p.read_text() for p in folder.iterdir()} if folder.is_dir() else {}


@pytest.mark.parametrize("atomic_exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_of_a_folder_replacement_leaves_the_old_or_the_new_folder(tmp_path, step, atomic_exchange):
    run = tmp_path / "run"
    out = run / "final"
    out.mkdir(parents=True)
    _fill(out, OLD)
    replace_and_die_at(out, step, atomic_exchange)
    assert resolve_model(run).path == out  # the next start (any --model reader) repairs first
    assert contents(out) in (OLD, NEW), (step, contents(out))
    if step in ("done", "new_moved", "exchanged"):
        assert contents(out) == NEW  # the new folder was in place before the kill
    with fsutil.atomic_folder(out) as tmp:  # the next write leaves nothing stale beside it
        _fill(tmp, NEW)
    assert sorted(p.name for p in run.iterdir()) == ["final"]


def test_the_exchange_is_used_where_the_os_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not fsutil.exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: the two-rename path is used (tested above)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_a_refused_run_never_removes_the_run_directory_another_process_holds(tmp_path, monkeypatch):
    """The race made deterministic: the other process creates and locks RUN_DIR exactly between this
    process deciding to create it and creating it."""
    run = tmp_path / "run"
    holder = {}
    real_mkdir = Path.mkdir

    def racing_mkdir(self, *a, **k):
        if self == run and not holder:
            holder["proc"] = subprocess.Popen(
                [sys.executable, "-c", "import sys, time; from pathlib import Path; from llamaforge.runs import lock_run\n"
                 "with lock_run(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)", str(run)],
                stdout=subprocess.PIPE, text=True)
            assert holder["proc"].stdout.readline().strip() == "held"
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    try:
        with pytest.raises(UserError, match="in use by another llamaforge process"):
            with lock_run(run):
                pass
        assert run.is_dir() and (run / ".lock").exists()  # the holder's folder and lock are intact
    finally:
        holder["proc"].kill()
        holder["proc"].wait()


def test_a_report_failing_late_leaves_the_old_report_whole(tmp_path, monkeypatch):
    """The plots are drawn, then the report fails: the old report folder is exactly as it was."""
    pytest.importorskip("matplotlib")
    import json

    from llamaforge.workflows import report

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"type": "train", "step": s, "time": 1000.0 + s, "loss": 5.0 - s / 10, "lr": 1e-3, "grad_norm": 1.0,
             "tokens_seen": 100 * s, "tokens_per_s": 100.0, "step_s": 1.0} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.md").write_text("old report\n")

    def late(*a, **k):
        assert list(tmp_path.glob(".rep.tmp-*/loss.png"))  # the new plots exist, beside the old report
        raise RuntimeError("late failure")

    monkeypatch.setattr(report, "_bench_section", late)
    with pytest.raises(RuntimeError, match="late failure"):
        report.make_report([run], out=tmp_path / "rep")
    assert contents(tmp_path / "rep") == {"report.md": "old report\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "run"]
    assert_user_error(run_cli("report", "--run", tmp_path / "nope", "--out", tmp_path / "rep"), "not a run directory")
