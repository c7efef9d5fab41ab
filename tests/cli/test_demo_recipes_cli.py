from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")


def test_ptq_recipe_ends_with_the_compare_table(cli, tmp_path):
    out = tmp_path / "ptq"
    result = cli("demo", "--recipe", "ptq", "--out", out, "--epochs", "1", "--time-budget", "0.1")
    assert result.exit_code == 0, result.output
    assert "Compression evaluation" in result.stdout
    table = result.stdout.split("Compression evaluation", 1)[1]
    assert "digits_fp32.onnx" in table and "digits_int8.onnx" in table
    assert "epoch 1/1: loss" in result.stderr
    for name in ("digits_fp32.onnx", "digits_int8.onnx", "test.npz", "compare.json"):
        assert (out / name).is_file(), name
    # The plain demo's gate files belong to `onnxq demo` without --recipe.
    assert not (out / "gate.json").exists()


def test_an_unknown_recipe_is_a_one_line_usage_error(cli, tmp_path):
    result = cli("demo", "--recipe", "nope", "--out", tmp_path)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'nope'" in lines[0] and "prune-finetune" in lines[0]
