from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from onnxq import export as export_mod
from onnxq import runtime
from onnxq.errors import CompileError, InputError
from onnxq.export import export_torch, load_factory, parse_input_shape
from onnxq.models import ZOO


def _ops(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _assert_matches_torch(path: Path, module: nn.Module, x: torch.Tensor) -> None:
    session = runtime.create_session(path)
    (got,) = runtime.run(session, {"input": x.numpy()}).values()
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def _opset(path: Path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


@pytest.fixture(scope="module")
def convnet() -> nn.Module:
    return ZOO["convnet"].factory()


@pytest.fixture(scope="module")
def dynamo_export(tmp_path_factory, convnet):
    """convnet through the dynamo exporter, once for the module (export takes seconds)."""
    folder = tmp_path_factory.mktemp("dynamo")
    return export_torch(convnet, (1, 3, 32, 32), folder / "convnet.onnx", exporter="dynamo")


# ---------------------------------------------------------------------------- dynamo


def test_dynamo_export_writes_one_checked_file(dynamo_export):
    assert dynamo_export.exporter == "dynamo"
    assert dynamo_export.fallback_reason is None
    # Only the model: no external .data file and no leftover scratch files.
    assert [p.name for p in dynamo_export.path.parent.iterdir()] == ["convnet.onnx"]
    onnx.checker.check_model(str(dynamo_export.path))
    assert _opset(dynamo_export.path) == 18


def test_dynamo_export_matches_torch_at_any_batch(dynamo_export, convnet):
    torch.manual_seed(0)
    for batch in (1, 3):
        _assert_matches_torch(dynamo_export.path, convnet, torch.randn(batch, 3, 32, 32))


def test_dynamo_without_optimize_keeps_batchnorm(dynamo_export):
    # onnxq's own passes fold BN; with optimize=False the exporter leaves BN and the
    # shape plumbing around it (Shape/Expand/CastLike) in place.
    ops = _ops(dynamo_export.path)
    assert ops["BatchNormalization"] == 3
    assert ops["Conv"] == 3


# ---------------------------------------------------------------------------- torchscript


def test_torchscript_export_keeps_batchnorm(tmp_path, convnet):
    result = export_torch(convnet, (1, 3, 32, 32), tmp_path / "ts.onnx", exporter="torchscript")
    assert (result.exporter, result.fallback_reason) == ("torchscript", None)
    assert _ops(result.path)["BatchNormalization"] == 3
    assert _opset(result.path) == 17
    _assert_matches_torch(result.path, convnet, torch.randn(3, 3, 32, 32))


def test_torchscript_optimize_folds_batchnorm(tmp_path, convnet):
    result = export_torch(
        convnet, (1, 3, 32, 32), tmp_path / "ts.onnx", exporter="torchscript", optimize=True
    )
    assert "BatchNormalization" not in _ops(result.path)


def test_static_batch_when_asked(tmp_path, convnet):
    result = export_torch(
        convnet, (2, 3, 32, 32), tmp_path / "s.onnx", exporter="torchscript", dynamic_batch=False
    )
    dim = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 2


# ---------------------------------------------------------------------------- fallback


def _dynamo_fails(*args, **kwargs):
    raise RuntimeError("unsupported op\nlong traceback text")


def test_auto_falls_back_to_torchscript(tmp_path, convnet, monkeypatch, caplog):
    monkeypatch.setattr(export_mod, "_export_dynamo", _dynamo_fails)
    with caplog.at_level(logging.WARNING, logger="onnxq.export"):
        result = export_torch(convnet, (1, 3, 32, 32), tmp_path / "m.onnx")
    assert result.exporter == "torchscript"
    assert result.fallback_reason == "RuntimeError: unsupported op"
    assert "falling back to TorchScript" in caplog.text
    assert result.path.is_file()


def test_forced_dynamo_failure_is_a_compile_error(tmp_path, convnet, monkeypatch):
    monkeypatch.setattr(export_mod, "_export_dynamo", _dynamo_fails)
    with pytest.raises(CompileError, match="dynamo exporter failed: RuntimeError: unsupported"):
        export_torch(convnet, (1, 3, 32, 32), tmp_path / "m.onnx", exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- bad input


def test_wrong_rank_shape_is_an_input_error(tmp_path, convnet):
    with pytest.raises(InputError, match=r"input of shape \[1, 3\]"):
        export_torch(convnet, (1, 3), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unknown_exporter_and_missing_folder(tmp_path, convnet):
    with pytest.raises(InputError, match="unknown exporter 'onnx'"):
        export_torch(convnet, (1, 3, 32, 32), tmp_path / "m.onnx", exporter="onnx")
    with pytest.raises(InputError, match="does not exist"):
        export_torch(convnet, (1, 3, 32, 32), tmp_path / "nope" / "m.onnx")


@pytest.mark.parametrize(
    ("text", "shape"), [("1,3,224,224", (1, 3, 224, 224)), ("2x16", (2, 16)), (" 4 ", (4,))]
)
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "a,b", "1,,3", "1,-3", "1,0", "1.5,2"])
def test_parse_input_shape_rejects_bad_text(text):
    with pytest.raises(InputError, match="bad input shape"):
        parse_input_shape(text)


def test_load_factory_accepts_zoo_names_classes_and_functions():
    assert isinstance(load_factory("digits")(), nn.Module)
    module = load_factory("onnxq.models.resnet:ResNet")()
    assert type(module).__name__ == "ResNet" and not module.training
    assert isinstance(load_factory("onnxq.models.mobilenet:mobilenet")(), nn.Module)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_model", "unknown model 'no_such_model'"),
        ("no_such_pkg_xyz.mod:f", "cannot import module 'no_such_pkg_xyz.mod'"),
        ("json:nope", "module 'json' has no attribute 'nope'"),
        ("json:__name__", "is a str, not a callable"),
        (":f", "expected package.module:callable"),
        ("json:", "expected package.module:callable"),
    ],
)
def test_load_factory_rejects_bad_specs(spec, message):
    with pytest.raises(InputError, match=message):
        load_factory(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("collections:OrderedDict", "returned a OrderedDict, not a torch nn.Module"),
        ("json:dumps", "failed to build a model: TypeError"),
    ],
)
def test_factory_that_does_not_build_a_module(spec, message):
    factory = load_factory(spec)
    with pytest.raises(InputError, match=message):
        factory()


# ---------------------------------------------------------------------------- CLI


def test_cli_exports_zoo_model_with_default_shape_and_dtype(cli, tmp_path):
    # lstm's default input is (1, 16) int64; torch.export specializes a size-1 dimension,
    # so this also checks that the exporter traces with >= 2 rows to keep the batch dynamic.
    out = tmp_path / "lstm.onnx"
    result = cli("export", "lstm", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (dynamo exporter)" in result.stdout
    graph_input = onnx.load(str(out)).graph.input[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [
        "batch",
        16,
    ]
    _assert_matches_torch(out, ZOO["lstm"].factory(), torch.randint(0, 8, (3, 16)))


def test_cli_exports_bert_with_mask_input_and_dynamic_batch_and_sequence(cli, tmp_path):
    out = tmp_path / "bert.onnx"
    result = cli("export", "bert", "-o", out)
    assert result.exit_code == 0, result.output
    inputs = onnx.load(str(out)).graph.input
    assert [i.name for i in inputs] == ["input_ids", "attention_mask"]
    for graph_input in inputs:
        dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        assert dims == ["batch", "sequence"]
    # Another batch and sequence length than the example's (1, 128).
    ids = torch.randint(0, 4096, (3, 40))
    mask = torch.ones_like(ids)
    mask[0, 30:] = 0
    (got,) = runtime.run(
        runtime.create_session(out), {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    ).values()
    with torch.no_grad():
        expected = ZOO["bert"].factory()(ids, mask).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_cli_torchscript_static_batch_custom_spec(cli, tmp_path):
    out = tmp_path / "m.onnx"
    result = cli(
        "export", "onnxq.models.digits:DigitsNet", "--input-shape", "2,1,8,8", "-o", out,
        "--exporter", "torchscript", "--no-dynamic-batch",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "torchscript exporter" in result.stdout
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "unknown model 'nope'"),
        (["onnxq.models.digits:DigitsNet"], "--input-shape is required"),
        (["digits", "--input-shape", "1,x"], "bad input shape '1,x'"),
        (["digits", "--input-shape", "1,8,8"], "input of shape [1, 8, 8]"),
        (["json:nope"], "has no attribute 'nope'"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(cli, tmp_path, args, message):
    result = cli("export", *args, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "m.onnx").exists()


def test_cli_missing_output_folder_exits_2(cli, tmp_path):
    result = cli("export", "digits", "-o", tmp_path / "nope" / "m.onnx")
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
