"""Loading and saving: one clear error per bad file, atomic writes, external data."""

from __future__ import annotations

import hashlib
import logging
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxq import io
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.errors import InputError


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def big_weight_model(build_onnx):
    """A model with a 256 KiB initializer: enough to be worth external data."""
    return build_onnx(
        """
        net (float[2,256] x) => (float[2,256] y) {
            y = MatMul (x, w)
        }
        """,
        {"w": np.random.default_rng(11).standard_normal((256, 256)).astype(np.float32)},
    )


@pytest.fixture
def external_data_model(big_weight_model, to_ir_model, tmp_path):
    """``big_weight_model`` saved in a subfolder as model.onnx + model.onnx.data."""
    folder = tmp_path / "external"
    folder.mkdir()
    path = io.save_model(to_ir_model(big_weight_model), folder / "model.onnx", external_data=True)
    assert (folder / "model.onnx.data").stat().st_size >= 256 * 256 * 4
    assert path.stat().st_size < 10_000
    return path


def test_load_round_trip(conv_bn_relu_model, save_onnx, assert_same_outputs):
    model = io.load_model(save_onnx(conv_bn_relu_model))
    assert [n.op_type for n in model.graph] == [n.op_type for n in conv_bn_relu_model.graph.node]
    assert_same_outputs(conv_bn_relu_model, model, tol=0.0)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_FILES = {
    "empty": (lambda data: b"", "file is empty"),
    "truncated": (_truncated, "not a valid ONNX model"),
    "text": (lambda data: b"hello, this is not a model\n" * 10, "not"),
    "random_bytes": (
        lambda data: np.random.default_rng(0).bytes(4096),
        "not",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file_is_an_input_error(kind, conv_bn_relu_model, tmp_path):
    make, message = BAD_FILES[kind]
    path = tmp_path / "bad.onnx"
    path.write_bytes(make(conv_bn_relu_model.SerializeToString()))

    with pytest.raises(InputError, match=message) as info:
        io.load_model(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        io.load_model(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="not a file"):
        io.load_model(tmp_path)


def test_output_path_checks(conv_bn_relu_model, save_onnx, tmp_path):
    src = save_onnx(conv_bn_relu_model)
    with pytest.raises(InputError, match="output path is the input model"):
        io.check_output_path(src, src)
    with pytest.raises(InputError, match="output path is the input model"):
        io.check_output_path(src, tmp_path / "." / src.name)
    with pytest.raises(InputError, match="does not exist"):
        io.check_output_path(src, tmp_path / "no_folder" / "out.onnx")
    with pytest.raises(InputError, match="is a folder"):
        io.check_output_path(src, tmp_path)
    io.check_output_path(src, tmp_path / "out.onnx")  # a new file beside it is fine


def test_failed_save_leaves_the_existing_file_intact(
    conv_bn_relu_model, to_ir_model, save_onnx, monkeypatch, tmp_path
):
    target = save_onnx(conv_bn_relu_model, "out.onnx")
    digest = sha256(target)

    def broken_save(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"partial")  # what a crash midway leaves behind
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_model(to_ir_model(conv_bn_relu_model), target)

    assert sha256(target) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no temp file left


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    with pytest.raises(RuntimeError), io.atomic_write(target, "w") as f:
        f.write("new, half written")
        raise RuntimeError

    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    with io.atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"


def test_external_data_round_trips_from_another_cwd(
    external_data_model, big_weight_model, monkeypatch, tmp_path, assert_same_outputs
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    model = io.load_model(external_data_model)

    expected = onnx.numpy_helper.to_array(big_weight_model.graph.initializer[0])
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), expected)
    assert_same_outputs(big_weight_model, model, tol=0.0)  # ORT from bytes: weights inline


def test_compile_of_external_data_model_into_another_folder(
    external_data_model, big_weight_model, monkeypatch, tmp_path, assert_same_outputs
):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    data_file = external_data_model.with_suffix(".onnx.data")
    digests = sha256(external_data_model), sha256(data_file)
    config = CompileConfig(quantize=False, verify=True)

    compile_model(external_data_model, "compiled.onnx", config)

    assert_same_outputs(big_weight_model, tmp_path / "out" / "compiled.onnx", tol=1e-6)
    assert (sha256(external_data_model), sha256(data_file)) == digests


@pytest.mark.parametrize("quantize", [True, False], ids=["int8", "no-quantize"])
def test_compile_of_model_kept_external_from_another_cwd(
    quantize, build_onnx, to_ir_model, monkeypatch, tmp_path, assert_same_outputs
):
    # Over the threshold the weights stay in their .data file (as past protobuf's 2 GB), and
    # opset 12 makes the pipeline upgrade the model through a proto round trip, which lost
    # the data file's folder: "FileNotFoundError: 'model.onnx.data'" from any other folder.
    weights = {"w": np.random.default_rng(3).standard_normal((256, 256)).astype(np.float32)}
    proto = build_onnx(
        "net (float[N,256] x) => (float[N,256] y) { h = MatMul (x, w)\n y = Relu (h) }",
        weights,
        opset=12,
    )
    (tmp_path / "model").mkdir()
    source = io.save_model(to_ir_model(proto), tmp_path / "model" / "m.onnx", external_data=True)
    data = tmp_path / "model" / "calib.npz"
    np.savez(data, x=np.random.default_rng(4).standard_normal((8, 256)).astype(np.float32))
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    assert isinstance(io.load_model(source).graph.initializers["w"].const_value, ir.ExternalTensor)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    config = CompileConfig(
        quantize=quantize, calibration=str(data) if quantize else None, check_latency=False
    )

    compile_model(source, "compiled.onnx", config)

    out = onnx.load(str(tmp_path / "out" / "compiled.onnx"))
    assert ("QuantizeLinear" in {n.op_type for n in out.graph.node}) == quantize
    assert_same_outputs(proto, out, tol=0.5 if quantize else 1e-5)


def test_missing_external_data_file_is_an_input_error(external_data_model):
    (external_data_model.parent / "model.onnx.data").unlink()
    with pytest.raises(InputError, match=r"external data file 'model\.onnx\.data' not found"):
        io.load_model(external_data_model)


def test_large_models_are_saved_with_external_data(
    big_weight_model, to_ir_model, monkeypatch, tmp_path
):
    model = to_ir_model(big_weight_model)
    io.save_model(model, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()

    # Over the threshold: weights go to a side file, as they must past protobuf's 2 GB.
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", io.model_nbytes(model) - 1)
    io.save_model(model, tmp_path / "large.onnx")

    assert (tmp_path / "large.onnx.data").stat().st_size >= 256 * 256 * 4
    assert (tmp_path / "large.onnx").stat().st_size < 10_000
    reloaded = io.load_model(tmp_path / "large.onnx")
    np.testing.assert_array_equal(
        reloaded.graph.initializers["w"].const_value.numpy(),
        model.graph.initializers["w"].const_value.numpy(),
    )


def test_model_nbytes_counts_initializers(big_weight_model, to_ir_model):
    assert io.model_nbytes(to_ir_model(big_weight_model)) == 256 * 256 * 4


def _as_ir3(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model as IR version 3 exporters wrote it: every initializer also a graph input."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    proto.ir_version = 3
    for t in proto.graph.initializer:
        proto.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    return proto


def test_ir3_model_is_normalised_once_and_compiles_to_a_valid_int8_model(
    conv_bn_relu_model, save_onnx, tmp_path, caplog
):
    source = save_onnx(_as_ir3(conv_bn_relu_model), "ir3.onnx")
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    config = CompileConfig(calibration=str(data), check_latency=False)

    with caplog.at_level(logging.WARNING):
        report = compile_model(source, tmp_path / "out.onnx", config)

    out = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(out)  # failed: "X_scale in initializer but not in graph input"
    assert [i.name for i in out.graph.input] == ["x"]
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}
    assert report.quantized_nodes
    notes = [r.getMessage() for r in caplog.records]
    assert len([n for n in notes if "IR version 3" in n]) == 1, notes
    assert not [n for n in notes if "graph input" in n and "IR version" not in n], notes


def test_model_of_ir_version_4_keeps_its_inputs(conv_bn_relu_model, save_onnx):
    # From IR 4 on, an initializer that is also an input is an overridable default.
    proto = _as_ir3(conv_bn_relu_model)
    proto.ir_version = 4
    model = io.load_model(save_onnx(proto))
    assert len(model.graph.inputs) == 1 + len(proto.graph.initializer)


def test_duplicate_node_names_are_repaired(
    conv_bn_relu_model, save_onnx, tmp_path, caplog, assert_same_outputs
):
    proto = onnx.ModelProto.FromString(conv_bn_relu_model.SerializeToString())
    for node in proto.graph.node:
        node.name = "layer"  # as some old exporters name every node
    source = save_onnx(proto, "dup.onnx")

    with caplog.at_level(logging.WARNING):
        compile_model(source, tmp_path / "out.onnx", CompileConfig(quantize=False, verify=True))

    names = [n.name for n in onnx.load(str(tmp_path / "out.onnx")).graph.node]
    assert len(set(names)) == len(names)
    assert_same_outputs(conv_bn_relu_model, tmp_path / "out.onnx", tol=1e-5)
    assert "renamed 5 duplicate node name(s)" in caplog.text


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (("h", "h"), "value 'h' is produced twice (by MatMul node 'a' and by Relu node 'b')"),
        (("x", "r"), "value 'x' is produced twice (by a graph input and by MatMul node 'a')"),
        (("w", "r"), "value 'w' is produced twice (by an initializer and by MatMul node 'a')"),
    ],
    ids=["two-nodes", "graph-input", "initializer"],
)
def test_value_produced_twice_is_an_input_error(outputs, message, save_onnx):
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    first, second = outputs
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w"], [first], name="a"),
        onnx.helper.make_node("Relu", [first], [second], name="b"),
        onnx.helper.make_node("MatMul", [second, "w"], ["y"], name="c"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        [w],
    )
    path = save_onnx(onnx.helper.make_model(graph))
    with pytest.raises(InputError, match=re.escape(message)):
        io.load_model(path)


def _external_weight_model(build_onnx, to_ir_model, tmp_path, seed: int):
    """A MatMul model saved with its weight external; returns (path, weight)."""
    w = np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32)
    proto = build_onnx("net (float[N,64] x) => (float[N,64] y) { y = MatMul (x, w) }", {"w": w})
    return io.save_model(to_ir_model(proto), tmp_path / "m.onnx", external_data=True), w


def test_unmap_external_data_closes_maps_of_weights_read(
    build_onnx, to_ir_model, monkeypatch, tmp_path
):
    source, w = _external_weight_model(build_onnx, to_ir_model, tmp_path, seed=5)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = io.load_model(source)
    tensor = model.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    assert io.unmap_external_data(model) == 0  # not read yet: nothing mapped
    np.testing.assert_array_equal(tensor.numpy(), w)
    assert tensor.raw is not None  # reading mapped the file, and the map stays
    assert io.unmap_external_data(model) == w.nbytes
    assert tensor.raw is None
    # Read again, it is mapped again: the same values.
    np.testing.assert_array_equal(tensor.numpy(), w)


def test_unmap_external_data_keeps_a_map_whose_array_is_in_use(
    build_onnx, to_ir_model, monkeypatch, tmp_path
):
    source, w = _external_weight_model(build_onnx, to_ir_model, tmp_path, seed=6)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = io.load_model(source)
    in_use = model.graph.initializers["w"].const_value.numpy()
    assert io.unmap_external_data(model) == 0
    np.testing.assert_array_equal(in_use, w)
    # In-memory weights (under the threshold) have no map to close.
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1_800_000_000)
    assert io.unmap_external_data(io.load_model(source)) == 0
