from __future__ import annotations

import json

import pytest

from onnxq.errors import InputError
from onnxq.recipes import run_recipe

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("torch_pruning")

# TorchScript exports in a tenth of a second (dynamo: seconds); the CLI test uses dynamo.
FAST = {"epochs": 1, "time_budget": 0.05, "exporter": "torchscript"}


def _rows(result) -> dict[str, dict]:
    return {r["model"].rsplit("/", 1)[-1]: r for r in result.compare["comparison"]}


def test_distill_compares_both_students_with_the_teacher(tmp_path):
    result = run_recipe("distill", tmp_path, **FAST)
    rows = _rows(result)
    assert list(rows) == [
        "digits_fp32.onnx",
        "student_fp32.onnx",
        "student_distilled_fp32.onnx",
        "student_distilled_int8.onnx",
    ]
    assert rows["student_fp32.onnx"]["parameters"] < rows["digits_fp32.onnx"]["parameters"] / 2
    torch_top1 = result.output.details["torch_top1"]
    # The ONNX model scores what its Torch original did on the same 360 images (a tie may flip one).
    assert rows["student_distilled_fp32.onnx"]["accuracy"]["top1"] == pytest.approx(
        torch_top1["student_distilled"], abs=1.5 / 360
    )
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["recipe"]["name"] == "distill"
    assert (tmp_path / "compare.md").is_file() and (tmp_path / "compare.html").is_file()


def test_prune_finetune_shrinks_the_model(tmp_path):
    result = run_recipe("prune-finetune", tmp_path, **FAST)
    rows = _rows(result)
    reference = rows["digits_fp32.onnx"]
    for name in ("pruned_fp32.onnx", "pruned_finetuned_fp32.onnx", "pruned_finetuned_int8.onnx"):
        assert rows[name]["macs"] < 0.6 * reference["macs"], name
    assert result.output.notes[0].startswith("channels:0.3: parameters")


def test_transfer_reports_source_target_and_compressed_accuracy(tmp_path):
    result = run_recipe("transfer", tmp_path, **FAST)
    table = result.output.details["transfer"]
    assert set(table) == {"frozen", "unfrozen"}
    for row in table.values():
        assert set(row) == {"source", "before", "after", "compressed"}
        assert row["source"] > 0.5  # 0-4 after one epoch
    rows = _rows(result)
    # The compressed column is the int8 model's accuracy on the target test set.
    assert table["frozen"]["compressed"] == rows["transfer_frozen_int8.onnx"]["accuracy"]["top1"]
    # Only the head trained in the frozen variant: both share the source features' size.
    assert (
        rows["transfer_frozen_fp32.onnx"]["parameters"]
        == rows["transfer_unfrozen_fp32.onnx"]["parameters"]
    )
    assert "target before" in result.output.notes[1]


def test_qat_compares_post_training_and_quantization_aware_int8(tmp_path):
    result = run_recipe("qat", tmp_path, **FAST)
    rows = _rows(result)
    names = ("digits_quarter_fp32", "digits_quarter_int8", "ptq_w4_int8", "qat_w4_int8")
    assert list(rows) == [f"{name}.onnx" for name in names]
    torch_top1 = result.output.details["torch_top1"]
    # The compiled model keeps the fake-quantized Torch model's numerics: same accuracy on
    # the same 360 images (a logit tie may flip one).
    assert rows["qat_w4_int8.onnx"]["accuracy"]["top1"] == pytest.approx(
        torch_top1["qat"], abs=1.5 / 360
    )
    assert rows["ptq_w4_int8.onnx"]["accuracy"]["top1"] == pytest.approx(
        torch_top1["ptq"], abs=1.5 / 360
    )


def test_recipes_are_repeatable(tmp_path):
    first = run_recipe("ptq", tmp_path / "a", **FAST).compare["comparison"]
    again = run_recipe("ptq", tmp_path / "b", **FAST).compare["comparison"]
    assert [r["accuracy"] for r in first] == [r["accuracy"] for r in again]
    assert [r["fidelity"] for r in first] == [r["fidelity"] for r in again]


def test_bad_requests_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="unknown recipe 'nope'"):
        run_recipe("nope", tmp_path)
    with pytest.raises(InputError, match="epochs"):
        run_recipe("ptq", tmp_path, epochs=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        run_recipe("ptq", tmp_path / "file")
