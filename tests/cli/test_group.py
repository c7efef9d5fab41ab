"""The ``onnxq`` group as a shell user meets it: one-line errors, pipes and ``--help``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from onnxq.errors import EXIT_USAGE


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["compile", "m.onnx", "--no-such-flag"], "No such option '--no-such-flag'"),
        (["compile", "-o", "out.onnx"], "Missing argument 'MODEL'"),
        (["compile", "m.onnx", "-o", "o.onnx", "--method", "median"], "'median' is not one of"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_usage_errors_are_one_line(cli, args, fragment):
    result = cli(*args)

    assert result.exit_code == EXIT_USAGE
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert "--help" in result.stderr  # says where to look
    assert "Usage:" not in result.output


def test_closed_stdout_exits_quietly():
    # The reader of stdout is gone before onnxq writes, as with ``onnxq passes | head -0``.
    process = subprocess.Popen(
        [sys.executable, "-m", "onnxq", "passes"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.stderr.close()

    assert process.wait(timeout=60) != 0
    assert stderr == ""


def test_piped_into_head_prints_no_error():
    result = subprocess.run(
        f"'{sys.executable}' -m onnxq passes | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert len(result.stdout.splitlines()) == 1
    assert "Error" not in result.stderr and "error" not in result.stderr


def test_help_shows_defaults_and_explains_values(cli):
    text = " ".join(cli("compile", "--help").output.split())

    assert "[default: minmax]" in text and "[default: 16]" in text  # --method, --batch-size
    for method in ("minmax (", "percentile (", "entropy (", "mse ("):
        assert method in text
    for target in ("auto (detect this machine)", "avx2", "vnni (", "cuda ("):
        assert target in text
    assert "CPUExecutionProvider" in text and "CUDAExecutionProvider" in text
    assert "mask:FILE.npz: an .npz mapping initializer names to 0/1 arrays" in text


def test_bench_help_names_its_extra_provider(cli):
    text = " ".join(cli("bench", "--help").output.split())
    assert "all: every available one" in text and "[default: cpu]" in text


def test_export_help_lists_the_zoo(cli):
    from onnxq.models import ZOO

    result = cli("export", "--help")

    assert result.exit_code == 0
    assert "Zoo models:" in result.output
    for name in ZOO:
        assert f"  {name} " in result.output
