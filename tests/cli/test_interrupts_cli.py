"""Interrupted runs (SIGINT, SIGTERM, SIGKILL) leave no hidden temporary files behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from classifier_fixtures import dataset, write_pair

# Runs the CLI with a pause while a temporary file exists beside the output, so the test
# can signal it at exactly that point. WHERE: "staging" (the int8 model, written and
# checked before its rename), "tmp" (any model being written), "created" (SIGINT to itself
# the instant a temporary file is created, before any code could register it).
_RUNNER = textwrap.dedent(
    """
    import os, signal, sys, time
    import onnx_ir as ir
    from onnxq import io
    from onnxq.cli import main

    # A non-interactive shell starts background jobs (a CI runner's, say) with SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler; restore it, as a
    # user's Ctrl-C in a terminal would find it.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    where = os.environ["WHERE"]

    def pause(path):
        print("READY", path, flush=True)
        time.sleep(120)

    save_model, save, os_open = io.save_model, ir.save, os.open

    def slow_save_model(model, path, **kwargs):
        result = save_model(model, path, **kwargs)
        if where == "staging" and str(path).endswith(".staging.onnx"):
            pause(path)
        return result

    def slow_save(model, path, **kwargs):
        save(model, path, **kwargs)
        if where == "tmp":
            pause(path)

    def interrupting_open(path, flags, *args, **kwargs):
        fd = os_open(path, flags, *args, **kwargs)
        name = os.path.basename(str(path))
        if name.startswith(".") and name.endswith((".tmp", ".staging.onnx")):
            os.kill(os.getpid(), signal.SIGINT)
        return fd

    io.save_model, ir.save = slow_save_model, slow_save
    if where == "created":
        os.open = interrupting_open
    main(sys.argv[1:], prog_name="onnxq")
    """
)


@pytest.fixture
def files(tmp_path) -> Path:
    write_pair(tmp_path)
    np.savez(tmp_path / "calib.npz", x=dataset()[0])
    (tmp_path / "out").mkdir()
    return tmp_path


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _compile_args(files: Path, where: str) -> list[str]:
    args = ["compile", str(files / "ref.onnx"), "-o", str(files / "out" / "m.onnx")]
    if where == "tmp":
        return [*args, "--no-quantize"]
    return [*args, "--calibration-data", str(files / "calib.npz"), "--no-latency-check"]


def _start(files: Path, where: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "WHERE": where, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _RUNNER, *_compile_args(files, where), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("where", ["staging", "tmp"])
def test_signal_during_a_compile_leaves_no_temporary_files(files, where, signum):
    out = files / "out"
    proc = _start(files, where, "--report", str(out / "r.json"))
    try:
        line = proc.stdout.readline()  # blocks until the pause
        assert line.startswith("READY"), proc.communicate(timeout=60)
        assert _hidden(out), "the test must signal while a temporary file exists"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert _hidden(out) == [], stderr
    assert not (out / "m.onnx").exists() and not (out / "r.json").exists()
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    # The shell's convention: 128 + the signal's number.
    assert proc.returncode == 128 + signum and signum.name in errors[0]
    assert "partial files removed" in errors[0]


@pytest.mark.parametrize("where", ["created"])
def test_sigint_the_moment_a_temporary_file_is_created_leaves_none(files, where):
    out = files / "out"
    proc = _start(files, where)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert _hidden(out) == [], stderr
    assert not (out / "m.onnx").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_run_removes_what_a_killed_run_left(cli, files):
    out = files / "out"
    dead = _dead_pid()
    stale = [
        ".m.onnx.staging.onnx",  # earlier versions' names
        ".m.onnx.k2j4_x9a.tmp",
        f".m.onnx.{dead}.0123abcd.tmp",
        f".m.onnx.{dead}.89abcdef.staging.onnx",
        f"..m.onnx.{dead}.89abcdef.staging.onnx.{dead}.01234567.tmp",  # the staging's own
    ]
    kept = [
        f".m.onnx.{os.getpid()}.0123abcd.tmp",  # a live process's: it may be writing it
        ".m.onnx.notes",  # not a name onnxq writes
        f".other.onnx.{dead}.0123abcd.tmp",  # another output's
    ]
    for name in stale + kept:
        (out / name).write_bytes(b"partial")
    (out / f".m.onnx.{dead}.76543210.tmp").mkdir()  # export's scratch folder
    stale.append(f".m.onnx.{dead}.76543210.tmp")

    result = cli("compile", files / "ref.onnx", "--no-quantize", "-o", out / "m.onnx")

    assert result.exit_code == 0, result.output
    assert _hidden(out) == sorted(kept)


def test_sigkill_leftovers_are_removed_by_the_next_run(cli, files):
    out = files / "out"
    proc = _start(files, "staging")
    try:
        assert proc.stdout.readline().startswith("READY")
        proc.kill()  # SIGKILL: no handler runs, the staging file stays
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert any(name.endswith(".staging.onnx") for name in _hidden(out))

    result = cli(*_compile_args(files, "staging"))

    assert result.exit_code == 0, result.output
    assert _hidden(out) == []
