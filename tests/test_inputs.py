"""Model input specs: static and dynamic dimensions, and the inputs generated from them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxq.errors import InputError
from onnxq.inputs import input_specs, random_inputs


def _model(*dims: int | str | None) -> ir.Model:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(dims))
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return ir.from_proto(onnx.helper.make_model(graph))


def test_minus_1_and_0_dims_are_dynamic():
    (spec,) = input_specs(_model(-1, 3, 0, "W"))
    assert spec.shape == (None, 3, None, "W")
    feeds = random_inputs([spec], batch=2, overrides={"x": (2, 3, 5, 5)})
    assert feeds["x"].shape == (2, 3, 5, 5)


def test_minus_1_batch_takes_the_batch_size():
    (spec,) = input_specs(_model(-1, 3))
    assert random_inputs([spec], batch=4)["x"].shape == (4, 3)
    with pytest.raises(InputError, match=r"dynamic dimension .* on axis 1"):
        random_inputs(input_specs(_model(1, -1)), batch=1)


def test_static_dims_stay_static():
    (spec,) = input_specs(_model(1, 3))
    assert spec.shape == (1, 3)
    assert random_inputs([spec], batch=4)["x"].shape == (1, 3)
    assert random_inputs([spec], batch=4)["x"].dtype == np.float32
