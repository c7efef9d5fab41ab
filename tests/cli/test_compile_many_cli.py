"""``onnxq compile-many``: the summary reports, exit codes, manifest errors and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET

import pytest
from fleet_fixtures import visible_files, write_fleet


def _reports(folder):
    return {
        fmt: folder / f"fleet.{ext}"
        for fmt, ext in (("json", "json"), ("markdown", "md"), ("junit", "xml"))
    }


def _report_args(reports):
    return [a for fmt, path in reports.items() for a in (f"--{fmt}", path)]


def _run_fleet(cli, tmp_path, *extra):
    manifest = write_fleet(tmp_path)
    reports = _reports(tmp_path)
    return cli("compile-many", manifest, *_report_args(reports), *extra), reports


def _check_reports(result, reports, tmp_path):
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "error: 2 of 3 models pass; not passing: c (error)"
    )
    assert visible_files(tmp_path / "out") == ["a.int8.onnx", "b.int8.onnx"]
    report = json.loads(reports["json"].read_text())
    assert report["kind"] == "fleet" and report["status"] == "fail"
    assert [e["status"] for e in report["models"]] == ["pass", "pass", "error"]
    suite = ET.parse(reports["junit"]).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["a", "b", "c"]
    assert suite.get("tests") == "3" and suite.get("errors") == "1"
    assert suite.get("failures") == "0"
    assert cases[0].find("error") is None and cases[0].find("failure") is None
    error = cases[2].find("error")
    assert error.get("message") == report["models"][2]["reason"]
    assert "missing x" in error.get("message")
    md = reports["markdown"].read_text()
    assert md.startswith("# onnxq fleet report: FAIL")
    assert any(line.startswith("| c | ERROR | not written |") for line in md.splitlines())
    assert "c: ERROR: " in result.stdout and "fleet FAIL" in result.stdout


def test_compile_many_writes_one_summary_and_exits_1_when_a_model_fails(cli, tmp_path):
    result, reports = _run_fleet(cli, tmp_path)
    _check_reports(result, reports, tmp_path)
    assert "models done: 3 of 3" in result.stderr  # progress, one line per model off a tty


def test_compile_many_on_ray(cli, tmp_path, ray_instance):
    result, reports = _run_fleet(cli, tmp_path, "--executor", "ray", "--workers", "2")
    _check_reports(result, reports, tmp_path)
    workers = {e["worker"] for e in json.loads(reports["json"].read_text())["models"]}
    assert all(not w.endswith(f":{os.getpid()}") for w in workers)


def test_a_gate_failure_is_a_junit_failure_and_its_model_is_not_written(cli, tmp_path):
    manifest = write_fleet(tmp_path)
    text = manifest.read_text().replace(
        '"b_calib.npz"\n[models.gate]\nmin-sqnr = 10',
        '"b_calib.npz"\n[models.gate]\nmin-sqnr = 200',
    )
    manifest.write_text(text)
    reports = _reports(tmp_path)
    result = cli("compile-many", manifest, *_report_args(reports))
    assert result.exit_code == 1, result.output
    assert visible_files(tmp_path / "out") == ["a.int8.onnx"]
    cases = ET.parse(reports["junit"]).getroot().find("testsuite").findall("testcase")
    failure = cases[1].find("failure")
    assert failure.get("type") == "fail" and "not >= 200" in failure.get("message")
    assert cases[2].find("error") is not None


def test_a_pyproject_fleet_that_passes_exits_0(cli, tmp_path, monkeypatch):
    manifest = write_fleet(tmp_path)
    # a and b only; gated on held-out labelled data; keys spelled with underscores too.
    text = manifest.read_text().split("[[models]]")
    fleet = text[0].replace("[defaults]", "[tool.onnxq.fleet.defaults]")
    for entry in text[1:3]:
        entry = entry.replace("[models.gate]", "[tool.onnxq.fleet.models.gate]")
        name = entry.split('"')[1].removesuffix(".onnx")
        entry += f'data = "{name}_eval.npz"\nlabels = "y"\nmax_accuracy_drop = 50\n'
        fleet += "[[tool.onnxq.fleet.models]]" + entry
    (tmp_path / "pyproject.toml").write_text('[tool.onnxq]\nmethod = "entropy"\n' + fleet)
    monkeypatch.chdir(tmp_path)
    result = cli("compile-many", "--json", "out/r.json")  # ./pyproject.toml by default
    assert result.exit_code == 0, result.output
    assert "fleet PASS: 2 of 2 models pass" in result.stdout
    assert visible_files(tmp_path / "out") == ["a.int8.onnx", "b.int8.onnx", "r.json"]
    report = json.loads((tmp_path / "out" / "r.json").read_text())
    for entry in report["models"]:
        # The fleet's own defaults apply, not [tool.onnxq] (a fleet.toml has none either).
        assert entry["compile"]["config"]["calibration_method"] == "minmax"
        assert entry["compile"]["config"]["check_latency"] is False
        assert [c["name"] for c in entry["gate"]["checks"]] == ["max_accuracy_drop", "min_sqnr"]


_A = 'calibration-data = "a_calib.npz"'

# (what is wrong, text replaced, its replacement, what the one-line error says)
MANIFEST_ERRORS = [
    ("unknown key", _A, _A + '\nmethd = "entropy"', "models[0] ('a'): unknown key 'methd'"),
    ("unknown top-level key", "[defaults]", "jobs = 2\n[defaults]", "unknown key 'jobs'"),
    ("unknown default", "[defaults]", "[defaults]\nname = 'x'", "defaults: unknown key 'name'"),
    ("unknown gate key", "min-sqnr = 10", "min-snr = 10", "gate: unknown key 'min-snr'"),
    ("missing model", '"b.onnx"', '"nope.onnx"', "model 'nope.onnx' does not exist"),
    ("missing data", '"c_calib.npz"', '"gone.npz"', "calibration data 'gone.npz' does not exist"),
    ("missing gate data", "min-sqnr = 10", 'min-sqnr = 10\ndata = "no.npz"', "'no.npz' does not"),
    ("duplicate output", "out/b.int8", "out/a.int8", "are the same file"),
    ("output is an input", '"out/c.int8.onnx"', '"a.onnx"', "output path is the models[0]"),
    ("output is data", '"out/c.int8.onnx"', '"b_calib.npz"', "is the models[1] ('b') calib"),
    ("no output folder", '"out/a.int8.onnx"', '"none/a.onnx"', "folder"),
    ("wrong type", _A, _A + "\nmethod = 3", "method must be a string, got 3"),
    ("bad choice", _A, _A + '\nmethod = "bogus"', "'bogus' is not one of"),
    ("bad setting", _A, _A + "\nbatch-size = 0", "batch size must be >= 1"),
    ("NaN threshold", "min-sqnr = 10", "min-sqnr = nan", "finite"),
    ("no threshold", "min-sqnr = 10", 'labels = "y"', "the gate sets no threshold"),
    ("drop without labels", "min-sqnr = 10", "max-accuracy-drop = 1", "needs labels"),
    ("duplicate name", 'model = "b.onnx"', 'model = "b.onnx"\nname = "a"', "duplicate name 'a'"),
    ("prune search", _A, _A + '\nprune = "channels:auto"', "sparsity search is not run"),
    ("not TOML", "[defaults]", "[defaults", "not valid TOML"),
    ("gate true", "[models.gate]\nmin-sqnr = 10", "gate = true", "a table, or false for no gate"),
]


@pytest.mark.parametrize(
    ("old", "new", "message"), [e[1:] for e in MANIFEST_ERRORS], ids=[e[0] for e in MANIFEST_ERRORS]
)
def test_manifest_errors_are_one_line_and_exit_2_before_any_work(cli, tmp_path, old, new, message):
    manifest = write_fleet(tmp_path)
    text = manifest.read_text()
    assert old in text
    manifest.write_text(text.replace(old, new, 1))
    before = visible_files(tmp_path)
    result = cli("compile-many", manifest, "--json", tmp_path / "out" / "r.json")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert visible_files(tmp_path) == before  # nothing compiled, nothing written


def test_a_report_may_not_overwrite_an_input(cli, tmp_path):
    manifest = write_fleet(tmp_path)
    result = cli("compile-many", manifest, "--junit", tmp_path / "a_calib.npz")
    assert (
        result.exit_code == 2 and "--junit" in result.stderr and "calibration data" in result.stderr
    )


def test_an_output_may_not_overwrite_a_data_module(cli, tmp_path, monkeypatch):
    manifest = write_fleet(tmp_path)
    (tmp_path / "datafn.py").write_text("def samples():\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = manifest.read_text().replace('"c_calib.npz"', '"datafn:samples"')
    text = text.replace(
        '"datafn:samples"\n[models.gate]', '"datafn:samples"\n[models.gate]\ndata = "c_eval.npz"'
    )
    manifest.write_text(text.replace('"out/c.int8.onnx"', '"datafn.py"'))
    result = cli("compile-many", manifest)
    assert result.exit_code == 2, result.output
    assert "output path is the models[2] ('c') calibration-data module" in result.stderr


def test_a_manifest_without_models(cli, tmp_path):
    (tmp_path / "fleet.toml").write_text("[defaults]\nmethod = 'entropy'\n")
    result = cli("compile-many", tmp_path / "fleet.toml")
    assert result.exit_code == 2 and "'models' must be a non-empty array" in result.stderr


def test_a_pyproject_without_a_fleet_table(cli, tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.onnxq]\nmethod = 'entropy'\n")
    result = cli("compile-many", tmp_path / "pyproject.toml")
    assert result.exit_code == 2 and "no [tool.onnxq.fleet] table" in result.stderr


# Calibration data that signals it is being read, then blocks: Ctrl-C comes while every
# worker is midway through a compile, with its scratch folder beside the output.
_SLOW_DATA = textwrap.dedent(
    """
    import os, time
    from pathlib import Path

    def samples():
        Path(os.environ["FLEET_READY"], str(os.getpid())).touch()
        time.sleep(120)
        return []
    """
)


# A shell's background job (a CI runner's, say) starts with SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler: restore it, as a terminal's Ctrl-C finds it.
_RUNNER = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from onnxq.cli import main; main(sys.argv[1:], prog_name='onnxq')"
)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_ctrl_c_stops_every_worker_and_leaves_no_partial_output(tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray", reason="the ray extra is not installed (onnxq[ray])")
    manifest = write_fleet(tmp_path)
    (tmp_path / "slowdata.py").write_text(_SLOW_DATA)
    text = manifest.read_text()
    for name in "ab":
        gate = "[models.gate]\nmin-sqnr = 10"
        text = text.replace(
            f'"{name}_calib.npz"\n{gate}', f'"slowdata:samples"\n{gate}\ndata = "{name}_eval.npz"'
        )
    manifest.write_text(text)
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FLEET_READY": str(ready)}
    args = ["compile-many", str(manifest), "--executor", executor, "--workers", "2"]
    # Its own session: a terminal's Ctrl-C signals the whole foreground process group.
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, *args, "--json", str(tmp_path / "out" / "r.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(ready.iterdir())) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        assert [p.name for p in (tmp_path / "out").iterdir()], "no scratch folder to clean"
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "error: interrupted by SIGINT; partial files removed" in stderr
    assert "Traceback" not in stderr
    assert visible_files(tmp_path / "out") == []  # no output, report or scratch file
    for pid in ready.iterdir():  # every worker stopped
        assert not _running(int(pid.name))


def _running(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
