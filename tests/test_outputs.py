"""Output directories are owned (issue 20, part A): every writing command checks its ``--out`` before any model
work (missing, empty, or this command's own result kind); anything else is refused naming the path and what is
there; ``--overwrite`` removes only a directory carrying a taskvec marker; a lock refuses a second process on the
same ``--out``; OS errors (read-only, disk full, a parent that is a file) are one line naming the path and leave
no hidden temporary behind.

Every refusal case asserts the error type, that the message names the path (or the value), that no model work
started, and that the directory tree is byte-for-byte what it was (nothing written, nothing deleted); resume cases
also that the finished work is still there."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from test_results import _patch, _sweep
from typer.testing import CliRunner

from taskvec_interp import io
from taskvec_interp.cli import app
from taskvec_interp.engine import run_conditions
from taskvec_interp.experiments.sweep import SweepResult
from taskvec_interp.io import (
    MARKER,
    OutputError,
    OutputLockedError,
    claim_result_dir,
    lock_path,
    out_lock,
    remove_result_dir,
    write_result_dir,
)

runner = CliRunner(env={"COLUMNS": "2000", "NO_COLOR": "1"})
NO_MODEL = "no/such-model"  # the shape of a hub id: only loading it would fail (and nothing may load it)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def _leftovers(root: Path) -> list[str]:
    """Hidden temporaries and locks anywhere under ``root``: none may survive a command."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*")
                  if re.search(r"\.(writing|old)-|\.lock$|\.tmp$|^\.tmp_", p.name))


def _user_dir(d: Path) -> Path:
    """A directory of the user's: two entries, one nested, none of them this package's."""
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("my notes, not a result")
    (d / "sub").mkdir()
    (d / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    return d


def _marked(d: Path, kind: str) -> Path:
    """A complete result directory of ``kind`` (one file), as the writer makes it."""
    with write_result_dir(d, kind, {"kind": kind}) as tmp:
        (tmp / "table.json").write_text(json.dumps({"kind": kind}))
    return d


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def no_work(monkeypatch):
    """Every way a command starts model work, replaced by a recorder that fails the test."""
    started: list[str] = []

    def spy(name: str) -> Callable:
        def fake(*a, **k):
            started.append(name)
            raise AssertionError(f"{name} ran before the bad --out was refused")
        return fake

    from importlib import import_module

    adapters_pkg, load_mod = import_module("taskvec_interp.adapters"), import_module("taskvec_interp.adapters.load")
    finetune_mod = import_module("taskvec_interp.experiments.finetune")
    analysis_mod = import_module("taskvec_interp.synthetic.analysis")
    train_mod = import_module("taskvec_interp.synthetic.train")

    monkeypatch.setattr(adapters_pkg, "load_model", spy("load_model"))
    monkeypatch.setattr(load_mod, "load_model", spy("load_model"))
    monkeypatch.setattr(finetune_mod, "_load_base", spy("finetune's model load"))
    monkeypatch.setattr(train_mod, "_train_runs", spy("synthetic training"))
    monkeypatch.setattr(analysis_mod, "analyze_run", spy("analyze_run"))
    monkeypatch.setattr(analysis_mod, "analyze_seeds", spy("analyze_seeds"))
    return started


@pytest.fixture(scope="module")
def tiny_dir(tiny_smol, tmp_path_factory):
    """A tiny model directory (4 layers) to pass as --model / --checkpoints (never loaded by the refusals)."""
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_smol.model.save_pretrained(d)
    tiny_smol.tokenizer.save_pretrained(d)
    return d


# ------------------------------------------------------------------------------------------------
# The refusal table: (id, setup(tmp, env) -> CLI args, error type, what the message must say)
# ------------------------------------------------------------------------------------------------
def _fake_run(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")  # the CLI's up-front check reads only that it is there
    return d


def _fake_seeds(d: Path, kind: str | None = None) -> Path:
    if kind is not None:
        claim_result_dir(d, kind)
    for seed in (0, 1):
        _fake_run(d / f"seed_{seed}")
    return d


def _killed_patch(d: Path) -> Path:
    """What a killed `taskvec patch` leaves: its finished chunks in OUT/.partial."""
    (d / ".partial").mkdir(parents=True)
    pd.DataFrame({"condition": [0], "exact": [True]}).to_parquet(d / ".partial" / "chunk_000000_1.parquet")
    (d / ".partial" / "conditions.json").write_text(json.dumps({"key": "abc", "n": 2, "chunk_size": 1}))
    return d


NOTES = r"notes\.txt, sub \(2 entries\)"
CASES: list[tuple[str, Callable, type[BaseException], str]] = [
    # --- the six data-loss cases of the issue: refused before any work, nothing touched
    ("td-user-dir", lambda t, e: ["td", "--model", NO_MODEL, "--out", _user_dir(t / "mine")],
     ValueError, r"--out \S*mine is not empty and holds no 'sweep' result \(no result\.json\): it holds " + NOTES),
    ("analyze-user-dir", lambda t, e: ["synthetic", "analyze", _fake_run(t / "run"), "--out", _user_dir(t / "mine")],
     ValueError, r"--out \S*mine is not empty and holds no 'analysis' result .*" + NOTES),
    ("patch-over-sweep", lambda t, e: ["patch", "--model", NO_MODEL, "--out", _marked(t / "td", "sweep")],
     ValueError, r"--out \S*td holds a 'sweep' result, not a 'patching' one: refusing to replace it \(result\.json"),
    ("trajectory-over-sweep", lambda t, e: ["trajectory", "--checkpoints", e["tiny"], "--out",
                                            _marked(t / "td", "sweep")],
     ValueError, r"--out \S*td holds a 'sweep' result, not a 'trajectory' one"),
    ("compare-over-sweep", lambda t, e: ["finetune", "compare", t / "no-run", "--out", _marked(t / "td", "sweep")],
     ValueError, r"--out \S*td holds a 'sweep' result, not a 'finetune_comparison' one"),
    ("demo-foreign-report", lambda t, e: ["demo", "--model", NO_MODEL, "--parts", "td", "--families", "bitwise",
                                          "--out", _report_dir(t / "site")],
     ValueError, r"--out \S*site is not empty and holds no 'demo' result .*it holds report\.html \(1 entry\)"),
    # --- every other writing command, over a user's directory or another command's result
    ("analyze-seeds-user-dir", lambda t, e: ["synthetic", "analyze", _fake_seeds(t / "runs"), "--out",
                                             _user_dir(t / "mine")],
     ValueError, r"--out \S*mine is not empty and holds no 'synthetic_seeds_analysis' result .*" + NOTES),
    ("analyze-default-out-user-files", lambda t, e: ["synthetic", "analyze", _user_analysis(t / "run")],
     ValueError, r"--out \S*run/analysis is not empty and holds no 'analysis' result .*plot\.png \(1 entry\)"),
    ("finetune-over-patching", lambda t, e: ["finetune", "--model", NO_MODEL, "--out", _marked(t / "p", "patching")],
     ValueError, r"--out \S*p holds a 'patching' result, not a 'finetune' one"),
    ("heads-user-dir", lambda t, e: ["heads", "--model", NO_MODEL, "--out", _user_dir(t / "mine")],
     ValueError, r"--out \S*mine is not empty and holds no 'heads' result .*" + NOTES),
    ("fv-over-sweep", lambda t, e: ["fv", "--model", NO_MODEL, "--out", _marked(t / "td", "sweep")],
     ValueError, r"--out \S*td holds a 'sweep' result, not a 'function_vectors' one"),
    ("train-user-dir", lambda t, e: ["synthetic", "train", "--config", "tiny", "--out", _user_dir(t / "mine")],
     ValueError, r"--out \S*mine is not empty and holds no training run .*notes\.txt, sub"),
    ("train-solo-into-seeds", lambda t, e: ["synthetic", "train", "--config", "tiny", "--out",
                                            _fake_seeds(t / "runs", "synthetic_seeds")],
     ValueError, r"--out \S*runs holds a 'synthetic_seeds' result, not a 'synthetic_run' one"),
    ("td-into-killed-patch", lambda t, e: ["td", "--model", NO_MODEL, "--out", _killed_patch(t / "p")],
     ValueError, r"--out \S*p is not empty and holds no 'sweep' result .*it holds \.partial \(1 entry\)"),
    ("td-result-with-user-file", lambda t, e: ["td", "--model", NO_MODEL, "--out", _with_notes(_marked(t / "td",
                                                                                                  "sweep"))],
     ValueError, r"--out \S*td holds a 'sweep' result \(result\.json\) and also notes\.txt \(1 entry\), which "
                 r"taskvec_interp did not write: refusing to replace it"),
    # --- paths that are never a result directory
    ("td-out-is-a-file", lambda t, e: ["td", "--model", NO_MODEL, "--out", _file(t / "f.txt")],
     ValueError, r"--out \S*f\.txt is a file, not a directory"),
    ("td-out-dot", lambda t, e: ["td", "--model", NO_MODEL, "--out", "."],
     ValueError, r"--out \. is the current directory: refusing to write a result there"),
    ("td-out-parent-of-cwd", lambda t, e: ["td", "--model", NO_MODEL, "--out", ".."],
     ValueError, r"--out \.\. is a parent of the current directory"),
    # --- --overwrite removes only a marked directory
    ("overwrite-user-dir", lambda t, e: ["td", "--model", NO_MODEL, "--overwrite", "--out", _user_dir(t / "mine")],
     ValueError, r"--out \S*mine is not empty .*" + NOTES + r"; refusing .*\(even with --overwrite: it removes "
                 r"only a directory with a taskvec marker\)"),
    ("overwrite-result-with-user-file", lambda t, e: ["patch", "--model", NO_MODEL, "--overwrite", "--out",
                                                      _with_notes(_marked(t / "td", "sweep"))],
     ValueError, r"--out \S*td holds a 'sweep' result \(result\.json\) and also notes\.txt"),
    ("overwrite-without-out", lambda t, e: ["finetune", "compare", t / "no-run", "--overwrite"],
     ValueError, r"--overwrite applies to --out, and no --out was given"),
    # --- options checked with the others, before any model work
    ("patch-chunk-0", lambda t, e: ["patch", "--model", NO_MODEL, "--chunk", "0", "--out", _killed_patch(t / "p")],
     ValueError, r"--chunk must be an int >= 1 \(conditions per saved chunk\), got 0"),
    ("patch-td-sweep-no-shots", lambda t, e: ["patch", "--model", NO_MODEL, "--shots", "4", "--td-sweep",
                                              _sweep().save(t / "td"), "--out", t / "p"],
     ValueError, r"--td-sweep \S*td: the TD table has no 4-shot rows \(has \[2\]\)"),
    ("trajectory-summary-layer-99", lambda t, e: ["trajectory", "--checkpoints", e["tiny"], "--summary-layer", "99",
                                                  "--out", t / "traj"],
     ValueError, r"--summary-layer 99 is not among the layers captured at checkpoint 0 \(\S+, 4 layers\)"),
    ("trajectory-layers-99", lambda t, e: ["trajectory", "--checkpoints", e["tiny"], "--layers", "1,99",
                                           "--out", t / "traj"],
     ValueError, r"--layers must be .*got \[1, 99\]: layer 99 out of range for a model with 4 layers \(at checkpoint 0"),
    # --- the demo validates its whole config before the synthetic part trains
    ("demo-model-missing", lambda t, e: ["demo", "--model", "./no/such/dir", "--out", t / "demo"],
     ValueError, r"DemoConfig\.model '\./no/such/dir' cannot resolve: not a built-in name"),
    ("demo-model-dir-without-config", lambda t, e: ["demo", "--model", _user_dir(t / "weights"), "--out", t / "demo"],
     ValueError, r"model directory '\S*weights' has no config\.json"),
    ("demo-finetune-family", lambda t, e: ["demo", "--model", NO_MODEL, "--finetune-family", "nope", "--out",
                                           t / "demo"],
     ValueError, r"DemoConfig\.finetune\.family 'nope': unknown task family 'nope'"),
    ("demo-backend-unimportable", lambda t, e: ["demo", "--model", NO_MODEL, "--backend", e["broken_backend"](),
                                                "--out", t / "demo"],
     ValueError, r"DemoConfig\.backend 'broken' cannot be used here \(ModuleNotFoundError"),
]


def _report_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "report.html").write_text("<html>the user's own report</html>")
    return d


def _user_analysis(run: Path) -> Path:
    _fake_run(run)
    (run / "analysis").mkdir()
    (run / "analysis" / "plot.png").write_bytes(b"png of the user's")
    return run


def _with_notes(d: Path) -> Path:
    (d / "notes.txt").write_text("my notes inside a result directory")
    return d


def _file(p: Path) -> Path:
    p.write_text("a file")
    return p


@pytest.mark.parametrize(("case", "setup", "error", "match"), CASES, ids=[c[0] for c in CASES])
def test_bad_out_is_refused_before_any_work(case, setup, error, match, tmp_path, tiny_dir, no_work, monkeypatch):
    from taskvec_interp.adapters.registry import Backend, register_backend, unregister_backend

    def broken_backend() -> str:
        register_backend(Backend("broken", "no_such_module_xyz:Adapter"))
        return "broken"

    work = tmp_path / "work"  # the current directory: `--out .` and `..` point here and above
    work.mkdir()
    monkeypatch.chdir(work)
    try:
        args = setup(tmp_path, {"tiny": tiny_dir, "broken_backend": broken_backend})
        before = _tree(tmp_path)
        res = _invoke(*args)
        after = _tree(tmp_path)
    finally:
        if "broken" in __import__("taskvec_interp.adapters.registry", fromlist=["x"]).BACKENDS:
            unregister_backend("broken")
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, error), f"{case}: {res.exception!r}\n{res.output}"
    message = str(res.exception)
    assert re.search(match, message), f"{case}: {message}"
    assert "\n" not in message
    assert not no_work, f"{case}: {no_work} started before the refusal"
    assert after == before, f"{case}: the tree changed: {sorted(set(after) ^ set(before))}"
    assert _leftovers(tmp_path) == [], f"{case} left {_leftovers(tmp_path)}"


def test_the_table_covers_every_writing_command():
    commands = ("td", "patch", "finetune", "compare", "trajectory", "train", "analyze", "heads", "fv", "demo")
    ids = [c[0] for c in CASES]
    assert all(any(i.startswith(f"{cmd}-") for i in ids) for cmd in commands), ids
    assert len(CASES) >= 25 and len(set(ids)) == len(ids)


# ------------------------------------------------------------------------------------------------
# The lock: a second process on the same --out is refused at once
# ------------------------------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys
    from taskvec_interp.io import out_lock
    with out_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # until the test closes it
""")


def test_a_second_process_on_the_same_out_is_refused(tmp_path, no_work):
    out = tmp_path / "td"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(tmp_path)
        res = _invoke("td", "--model", NO_MODEL, "--out", out)
        assert isinstance(res.exception, OutputLockedError), res.output
        assert re.search(rf"{re.escape(str(out))} is being written by another process \(pid {holder.pid} on "
                         rf"{re.escape(socket.gethostname())}.*lock file {re.escape(str(lock_path(out)))}",
                         str(res.exception))
        assert not no_work and _tree(tmp_path) == before  # its lock file is still the holder's
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not lock_path(out).exists()  # released when the holder's block ended
    assert not out.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "td"
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "yesterday"}))
    with pytest.warns(UserWarning, match=rf"took over the stale lock {re.escape(str(lock))} .*pid {dead.pid}"), \
            out_lock(out):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with out_lock(out):  # nested in one process: free
            pass
        assert lock.exists()
    assert not lock.exists() and _leftovers(tmp_path) == []


def test_a_lock_of_another_host_is_refused_and_kept(tmp_path):
    out = tmp_path / "td"
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "now"}))
    before = _tree(tmp_path)
    with pytest.raises(OutputLockedError, match=r"pid 1 on elsewhere\.example.*delete the lock file only if"), \
            out_lock(out):
        pass
    assert _tree(tmp_path) == before


def test_the_lock_is_released_when_the_command_fails(tmp_path, no_work):
    out = tmp_path / "td"
    res = _invoke("td", "--model", NO_MODEL, "--out", out)  # passes the checks, then the model load fails
    assert isinstance(res.exception, AssertionError) and no_work == ["load_model"]
    assert _leftovers(tmp_path) == [] and not out.exists()


# ------------------------------------------------------------------------------------------------
# OS errors: one line naming the path, no hidden temporary left
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_sweep(monkeypatch):
    """`taskvec td` with its model work replaced by a prebuilt result: what is left is the command's writing."""
    from taskvec_interp.adapters import load as load_mod
    from taskvec_interp.experiments import sweep as sweep_mod

    monkeypatch.setattr(load_mod, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(__import__("taskvec_interp.adapters", fromlist=["x"]), "load_model", lambda *a, **k: object())
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda adapter, cfg, **k: _sweep())


def _fail_with(monkeypatch, target, name: str, code: int, when: Callable = lambda *a, **k: True,
               path: Callable = lambda *a: a[0]) -> None:
    """``target.name`` raises ``OSError(code)`` naming the file it was given (``path(*args)``) when ``when``."""
    real = getattr(target, name)

    def fail(*a, **k):
        if when(*a, **k):
            raise OSError(code, os.strerror(code), str(path(*a)))
        return real(*a, **k)

    monkeypatch.setattr(target, name, fail)


def test_disk_full_while_saving_is_one_line_and_leaves_no_temporary(tmp_path, fake_sweep, monkeypatch):
    out = tmp_path / "td"
    _fail_with(monkeypatch, pd.DataFrame, "to_parquet", errno.ENOSPC, path=lambda frame, file, *a: file)
    res = _invoke("td", "--model", NO_MODEL, "--no-figures", "--out", out)
    assert isinstance(res.exception, OutputError) and res.exception.errno == errno.ENOSPC
    assert re.fullmatch(rf"cannot write the sweep result to {re.escape(str(out))}: No space left on device \(.*\)",
                        str(res.exception))
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_read_only_directory_keeps_the_old_result_whole(tmp_path, fake_sweep, monkeypatch):
    out = _sweep(7).save(tmp_path / "td")  # an earlier sweep in the same --out: replaced only whole
    before = _tree(tmp_path)
    _fail_with(monkeypatch, io.os, "replace", errno.EROFS, when=lambda src, dst: ".writing-" in str(src))
    res = _invoke("td", "--model", NO_MODEL, "--no-figures", "--out", out)
    assert isinstance(res.exception, OutputError) and res.exception.errno == errno.EROFS
    assert re.fullmatch(rf"cannot write the sweep result to {re.escape(str(out))}: Read-only file system.*",
                        str(res.exception))
    monkeypatch.undo()
    assert _tree(tmp_path) == before and _leftovers(tmp_path) == []
    assert SweepResult.load(out).fit == _sweep(7).fit  # the finished work is still there, intact


@pytest.mark.parametrize("command", [["td", "--model", NO_MODEL], ["demo", "--model", NO_MODEL],
                                     ["synthetic", "train", "--config", "tiny"]], ids=["td", "demo", "train"])
def test_a_read_only_parent_is_refused_before_any_work(command, tmp_path, no_work, monkeypatch):
    out = tmp_path / "out"  # the demo would train its synthetic part first: the output is checked before
    _fail_with(monkeypatch, io.os, "open", errno.EROFS, when=lambda path, *a: str(path).endswith(".lock"))
    res = _invoke(*command, "--out", out)
    assert isinstance(res.exception, OutputError) and res.exception.errno == errno.EROFS
    assert re.fullmatch(rf"cannot lock {re.escape(str(out))}: Read-only file system \(\S+\.out\.lock\)",
                        str(res.exception))
    assert not no_work and _tree(tmp_path) == {}


def test_console_script_an_out_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "td"
    res = subprocess.run([sys.executable, "-m", "taskvec_interp.cli", "td", "--model", NO_MODEL, "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith(f"Error: cannot create the parent directory of {out}: ")
    assert (tmp_path / "file").read_text() == "x" and _leftovers(tmp_path) == []


def test_disk_full_in_a_chunk_keeps_the_finished_chunks(tmp_path, monkeypatch):
    ckpt = tmp_path / "p" / ".partial"
    calls = []

    def evaluate(chunk):
        calls.append([c["i"] for c in chunk])
        return [{"value": c["i"] * 2} for c in chunk]

    conds = [{"i": i} for i in range(4)]
    real = pd.DataFrame.to_parquet
    written = []

    def full_after_one(self, path, *a, **k):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written.append(path)
        return real(self, path, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_after_one)
    with pytest.raises(OSError, match="No space left on device"):
        run_conditions(conds, evaluate, chunk_size=2, checkpoint_dir=ckpt, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("chunk_")) == ["chunk_000000_2.parquet"]
    assert _leftovers(tmp_path) == [] and not list(ckpt.glob("*.tmp"))
    table = run_conditions(conds, evaluate, chunk_size=2, checkpoint_dir=ckpt, progress=False)  # resumes
    assert calls == [[0, 1], [2, 3], [2, 3]] and table["value"].tolist() == [0, 2, 4, 6]


def test_a_failed_claim_leaves_nothing(tmp_path, monkeypatch):
    _fail_with(monkeypatch, io, "atomic_write_text", errno.ENOSPC)
    with pytest.raises(OutputError, match=rf"cannot start the finetune result in {re.escape(str(tmp_path / 'run'))}: "
                                          "No space left on device"):
        claim_result_dir(tmp_path / "run", "finetune")
    assert _tree(tmp_path) == {}


# ------------------------------------------------------------------------------------------------
# --overwrite and the writers' own rules
# ------------------------------------------------------------------------------------------------
def test_overwrite_replaces_a_result_of_another_kind_only(tmp_path, fake_sweep):
    out = _patch().save(tmp_path / "out")
    _user_dir(tmp_path / "mine")
    mine = _tree(tmp_path / "mine")
    res = _invoke("td", "--model", NO_MODEL, "--no-figures", "--out", out)  # without --overwrite: refused
    assert isinstance(res.exception, ValueError) and "holds a 'patching' result, not a 'sweep' one" in str(res.exception)
    res = _invoke("td", "--model", NO_MODEL, "--no-figures", "--overwrite", "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / MARKER).read_text())["kind"] == "sweep" and SweepResult.load(out).fit == _sweep().fit
    assert _tree(tmp_path / "mine") == mine and _leftovers(tmp_path) == []


def test_remove_result_dir_never_removes_an_unmarked_directory(tmp_path):
    mine = _user_dir(tmp_path / "mine")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(mine))} is not empty .*even with --overwrite"):
        remove_result_dir(mine)
    assert _tree(tmp_path) == before
    assert remove_result_dir(tmp_path / "missing") is False
    assert remove_result_dir(_marked(tmp_path / "r", "heads")) is True and not (tmp_path / "r").exists()
    assert _tree(tmp_path) == before


def test_a_same_kind_result_is_replaced_and_resume_state_kept(tmp_path):
    from taskvec_interp.io import check_result_owner

    traj = tmp_path / "traj"
    (traj / "per_step" / "step_0000010").mkdir(parents=True)  # a killed trajectory: finished checkpoints only
    (traj / "per_step" / "step_0000010" / "td.parquet").write_bytes(b"finished")
    before = _tree(tmp_path)
    assert check_result_owner(traj, "trajectory", ("per_step",), what="--out") == traj  # resumable
    with pytest.raises(ValueError, match=r"holds no 'sweep' result .*per_step \(1 entry\)"):
        check_result_owner(traj, "sweep", what="--out")
    assert _tree(tmp_path) == before


def test_the_demo_writes_report_html_only_into_its_own_directory(tmp_path):
    from types import SimpleNamespace

    from taskvec_interp.demo import run_demo
    from taskvec_interp.figures import write_demo_report

    site = _report_dir(tmp_path / "site")
    before = _tree(tmp_path)
    fake = SimpleNamespace(out=str(site), model={"name": "x"}, config=None, parts=[], seconds=0.0)
    with pytest.raises(ValueError, match=rf"{re.escape(str(site))} is not a demo's directory .*refusing to write "
                                         r"report\.html"):
        write_demo_report(fake)
    with pytest.raises(ValueError, match=r"holds no 'demo' result .*report\.html \(1 entry\)"):
        run_demo(site)  # the library refuses it too, before any part runs
    assert _tree(tmp_path) == before and _leftovers(tmp_path) == []
