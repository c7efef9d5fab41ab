from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from onnxq.demo import run_demo
from onnxq.errors import InputError

pytest.importorskip("torch")
pytest.importorskip("sklearn")

# One table row: name, top-1 %, p50 ms at batch 1, samples/s at batch 32, size.
ROW = re.compile(r"^(fp32|int8)\s+(\d+\.\d+)%\s+(\d+\.\d+)\s+([\d,]+)\s+(\d+\.\d+) KB$", re.M)

FILES = (
    "digits_fp32.onnx",
    "digits_int8.onnx",
    "calib.npz",
    "test.npz",
    "compile.json",
    "bench.json",
    "gate.json",
    "gate.md",
    "gate.xml",
)


def test_demo_writes_everything_and_prints_the_comparison(cli, tmp_path):
    out = tmp_path / "demo"
    result = cli("demo", "--out", out, "--epochs", "2", "--time-budget", "0.5")
    gate = json.loads((out / "gate.json").read_text())
    # The exit code is the gate's; a short, noisy timing run may legitimately fail it.
    assert result.exit_code == (0 if gate["status"] == "pass" else 1), result.output
    for name in FILES:
        assert (out / name).is_file(), name
    pytest.importorskip("matplotlib")
    assert (out / "gate.html").is_file()

    rows = {m[1]: m.groups()[1:] for m in ROW.finditer(result.stdout)}
    assert set(rows) == {"fp32", "int8"}, result.stdout
    for top1, p50_ms, throughput, _size in rows.values():
        assert 50.0 < float(top1) <= 100.0
        assert float(p50_ms) > 0 and int(throughput.replace(",", "")) > 0
    accuracy = gate["eval"]["accuracy"]
    assert float(rows["fp32"][0]) == pytest.approx(100 * accuracy["reference"]["top1"], abs=0.01)
    assert float(rows["int8"][0]) == pytest.approx(100 * accuracy["candidate"]["top1"], abs=0.01)
    assert f"gate {gate['status'].upper()} (top-1 drop <= 0.5 points" in result.stdout
    assert "speedup over fp32" in result.stdout and str(out) in result.stdout
    # int8 is also compared with onnxq's optimised fp32, at both batch sizes.
    assert (out / "digits_fp32_optimised.onnx").is_file()
    assert "speedup over onnxq's optimised fp32: " in result.stdout
    bench = json.loads((out / "bench.json").read_text())
    timed = {(Path(r["model"]).name, r["batch"]) for r in bench["results"]}
    assert {("digits_fp32_optimised.onnx", 1), ("digits_fp32_optimised.onnx", 32)} <= timed
    assert "latency check at batch 1: " in result.stdout


def test_demo_rejects_a_file_as_output_folder(cli, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    result = cli("demo", "--out", target)
    assert result.exit_code == 2
    assert "is a file" in result.stderr
    with pytest.raises(InputError, match="not a folder"):
        run_demo(target)
