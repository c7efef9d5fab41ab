"""Fleet compile: one task per model on the local executor and on a real local Ray instance."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx
import pytest
from fleet_fixtures import visible_files, write_fleet
from ort_helpers import op_types, ort_outputs

from onnxq.cli._manifest import read_manifest
from onnxq.evaluate import sqnr_db
from onnxq.executor import make_executor
from onnxq.fleet import ERROR, FAIL, PASS, _publish, compile_and_gate, run_fleet


@pytest.fixture
def fleet(tmp_path):
    return read_manifest(write_fleet(tmp_path)).models


def _check_two_written_one_failed(report, folder):
    """a and b compiled to int8, gated and written; c failed and left nothing behind."""
    assert [e["name"] for e in report["models"]] == ["a", "b", "c"]  # manifest order
    a, b, c = report["models"]
    for entry in (a, b):
        assert entry["status"] == PASS and entry["written"] and entry["reason"] is None
        assert entry["gate"]["status"] == PASS and entry["gate"]["candidate"] == entry["output"]
        assert entry["compile"]["output"] == entry["output"]
        model = onnx.load(entry["output"])
        assert "QuantizeLinear" in op_types(model)
        # The written file is the model that was gated: its SQNR on the gate data is the
        # one the gate measured (the classifier has one output). 0.5 dB: the gate runs
        # ONNX Runtime's fused int8 kernels, this check the unoptimised graph.
        feeds = {"x": np.load(folder / f"{entry['name']}_calib.npz")["x"]}
        ref, got = ort_outputs(entry["model"], feeds), ort_outputs(entry["output"], feeds)
        measured = sqnr_db(ref["probs"], got["probs"])
        assert measured == pytest.approx(entry["gate"]["checks"][0]["value"], abs=0.5)
    assert c["status"] == ERROR and not c["written"] and c["compile"] is None
    assert "missing x" in c["reason"] and "\n" not in c["reason"]
    assert report["status"] == FAIL and report["counts"] == {PASS: 2, FAIL: 0, ERROR: 1}
    assert report["summary"] == "2 of 3 models pass; not passing: c (error)"
    # Only the two outputs were added, and no scratch file is left.
    assert visible_files(folder / "out") == ["a.int8.onnx", "b.int8.onnx"]


def test_local_fleet_writes_the_models_that_pass_and_goes_on_after_a_failure(fleet, tmp_path):
    done = []
    with make_executor("local") as executor:
        report = run_fleet(fleet, executor, progress=lambda d, t: done.append((d, t)))
    _check_two_written_one_failed(report, tmp_path)
    assert done == [(1, 3), (2, 3), (3, 3)]
    assert {e["worker"].rsplit(":", 1)[1] for e in report["models"]} == {str(os.getpid())}


def test_ray_fleet_runs_the_models_on_ray_workers(fleet, tmp_path, ray_instance):
    with make_executor("ray", 2) as executor:
        report = run_fleet(fleet, executor)
    _check_two_written_one_failed(report, tmp_path)
    pids = {e["worker"].rsplit(":", 1)[1] for e in report["models"]}
    assert str(os.getpid()) not in pids


def test_a_model_that_misses_its_gate_is_not_written(fleet, tmp_path):
    strict = dataclasses.replace(
        fleet[0].gate, thresholds=dataclasses.replace(fleet[0].gate.thresholds, min_sqnr=200.0)
    )
    entry = compile_and_gate(dataclasses.replace(fleet[0], gate=strict))
    assert entry["status"] == FAIL and not entry["written"]
    assert (
        entry["reason"].startswith("gate: worst-output SQNR dB") and "not >= 200" in entry["reason"]
    )
    assert entry["compile"] is not None and entry["gate"]["status"] == FAIL
    assert visible_files(tmp_path / "out") == []


def test_a_model_without_a_gate_is_written_when_it_compiles(fleet, tmp_path):
    entry = compile_and_gate(dataclasses.replace(fleet[1], gate=None))
    assert entry["status"] == PASS and entry["written"] and entry["gate"] is None
    assert visible_files(tmp_path / "out") == ["b.int8.onnx"]


class _LosingExecutor:
    """An executor whose second task's worker died: its slot holds the exception."""

    def map(self, fn, items, *, shared=(), return_exceptions=False, progress=None):
        assert return_exceptions  # one model's failure must not stop the others
        return [
            fn(item, *shared) if i != 1 else OSError("worker died") for i, item in enumerate(items)
        ]


def test_a_task_whose_worker_died_is_an_error_entry(fleet):
    report = run_fleet(fleet[:2], _LosingExecutor())
    assert [e["status"] for e in report["models"]] == [PASS, ERROR]
    assert report["models"][1]["reason"] == "OSError: worker died"


def test_an_interrupt_removes_the_scratch_folders_and_propagates(fleet, tmp_path):
    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), make_executor("local") as executor:
        run_fleet(fleet, executor, progress=interrupt)
    # The model that finished is complete; the others never started.
    assert visible_files(tmp_path / "out") == ["a.int8.onnx"]


def test_publishing_moves_the_external_data_file_with_the_model(tmp_path):
    # Models over 2 GB keep their weights in NAME.data beside them, named inside the model.
    scratch, out = tmp_path / ".scratch", tmp_path / "m.onnx"
    scratch.mkdir()
    for name in ("m.onnx", "m.onnx.data"):
        (scratch / name).write_text(name)
    _publish(scratch, scratch / "m.onnx", out)
    assert visible_files(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").read_text() == "m.onnx.data"
