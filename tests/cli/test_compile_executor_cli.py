"""``onnxq compile --workers/--executor``: sharded calibration gives the one-process ranges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from graph_builders import fusing_model, seeded


@pytest.fixture
def files(tmp_path):
    onnx.save(fusing_model(), tmp_path / "net.onnx")
    x = seeded(1)(40, 4, 8, 8) * (1.5 ** (np.arange(40) % 7))[:, None, None, None]
    np.savez(tmp_path / "calib.npz", x=x.astype(np.float32))
    return tmp_path


def _compile(cli, files, name, *flags):
    return cli(
        "compile", files / "net.onnx", "-o", files / f"{name}.onnx",
        "--calibration-data", files / "calib.npz", "--batch-size", "4", "--method", "entropy",
        "--no-latency-check", "--save-ranges", files / f"{name}.json",
        "--report", files / f"{name}-report.json", *flags,
    )  # fmt: skip


def test_two_workers_write_the_ranges_of_one_process(cli, files):
    one = _compile(cli, files, "one")
    two = _compile(cli, files, "two", "--workers", "2")
    assert one.exit_code == 0, one.output
    assert two.exit_code == 0, two.output
    ranges = [json.loads((files / f"{n}.json").read_text()) for n in ("one", "two")]
    assert ranges[0]["ranges"] == ranges[1]["ranges"]
    assert ranges[1]["meta"]["shards"] == 2
    report = json.loads((files / "two-report.json").read_text())
    assert '"shards": 2' in json.dumps(report)
    assert '"shards"' not in (files / "one-report.json").read_text()


def test_workers_from_the_config_file(cli, files):
    config = files / "onnxq.toml"
    config.write_text('[tool.onnxq]\nworkers = 2\nexecutor = "local"\n')
    result = _compile(cli, files, "cfg", "--config", config)
    assert result.exit_code == 0, result.output
    assert '"shards": 2' in (files / "cfg-report.json").read_text()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--executor", "ray"), "install onnxq[ray]"),
        (("--ray-address", "ray://head:10001"), "--ray-address needs --executor ray"),
    ],
)
def test_executor_errors_are_one_line(cli, files, monkeypatch, flags, fragment):
    monkeypatch.setitem(sys.modules, "ray", None)  # as without the ray extra
    result = _compile(cli, files, "bad", *flags)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (files / "bad.onnx").exists()


# Ctrl-C while the pool's workers calibrate: the parent signals itself once the pool runs
# and prints its workers' pids, so the test can check that none outlives the command.
_INTERRUPTED = textwrap.dedent(
    """
    import os, signal, sys, threading
    from onnxq.cli import main
    from onnxq.executor import PoolExecutor

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    pool_for = PoolExecutor._pool_for

    def interrupted_pool_for(self, shared):
        pool = pool_for(self, shared)
        print("WORKERS", *[p.pid for p in pool._pool], flush=True)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        return pool

    PoolExecutor._pool_for = interrupted_pool_for
    sys.exit(main(sys.argv[1:]))
    """
)


def test_ctrl_c_stops_every_worker_and_writes_nothing(files):
    x = seeded(2)(4000, 4, 8, 8)  # enough that the shards are still running after 1 s
    np.savez(files / "calib.npz", x=x)
    args = ["compile", files / "net.onnx", "-o", files / "out.onnx", "--workers", "2"]
    args += ["--calibration-data", files / "calib.npz", "--batch-size", "1"]
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    workers = [int(p) for p in proc.stdout.split("WORKERS")[1].split()]
    assert len(workers) == 2
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (files / "out.onnx").exists()
    assert not [p for p in os.listdir(files) if p.startswith(".")]  # no temporary files
