"""The compile pipeline: per-pass records, --verify, user pass registration and loading."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graph_builders import seeded

from onnxq import plugins
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.errors import CompileError, InputError, VerificationError
from onnxq.passes.fuse import FoldBatchNormPass
from onnxq.pipeline import available_passes, build_pipeline
from onnxq.plugins import load_pass, register_pass
from onnxq.recording import Step, run_pipeline

FP32 = CompileConfig(quantize=False)


class ScaleConvWeightPass(ir.passes.InPlacePass):
    """Multiplies the first Conv weight by a factor: a deliberately wrong user pass."""

    factor = -1.0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        conv = next(n for n in model.graph if n.op_type == "Conv")
        weight = conv.inputs[1]
        weight.const_value = ir.tensor(weight.const_value.numpy() * np.float32(self.factor))
        return ir.passes.PassResult(model, modified=True)


class NudgeConvWeightPass(ScaleConvWeightPass):
    """Scales a weight by 1.01: about 40 dB SQNR, far outside an exact pass's tolerance."""

    factor = 1.01


class FailingPass(ir.passes.InPlacePass):
    """Raises inside the pass."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise ZeroDivisionError("boom")


class UnknownOpPass(ir.passes.InPlacePass):
    """Ends the graph in an op no ONNX Runtime kernel implements: a model it cannot load."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.opset_imports["com.example"] = 1
        out = model.graph.outputs[0]
        node = ir.Node("com.example", "Nope", [out], num_outputs=1)
        node.outputs[0].name, node.outputs[0].type = "nope", out.type
        model.graph.append(node)
        model.graph.outputs[0] = node.outputs[0]
        return ir.passes.PassResult(model, modified=True)


class NotAPass:
    """Looks like a class, is not an onnx_ir pass."""


@pytest.fixture
def user_registry(monkeypatch) -> dict:
    """An empty user pass registry, restored after the test."""
    registry: dict = {}
    monkeypatch.setattr(plugins, "_USER_PASSES", registry)
    return registry


def test_records_one_line_per_pass(conv_bn_relu_model, to_ir_model):
    steps = build_pipeline(FP32)

    model, records = run_pipeline(to_ir_model(conv_bn_relu_model), steps)

    assert [r.name for r in records] == [s.name for s in steps]
    assert [r.stage for r in records] == [s.stage for s in steps]
    assert all(r.seconds >= 0 and isinstance(r.modified, bool) for r in records)
    for before, after in itertools.pairwise(records):
        assert after.nodes_before == before.nodes_after  # records chain
    assert records[0].nodes_before == 6
    assert records[-1].nodes_after == len(model.graph) == 4
    (fold,) = [r for r in records if r.name == "FoldBatchNormPass"]
    assert (fold.modified, fold.nodes_before, fold.nodes_after) == (True, 6, 4)
    assert fold.details["batchnorm_after"] == 0
    assert all(r.max_abs_diff is None for r in records)  # no verifier


def test_compile_report_lists_the_passes(conv_bn_relu_model, save_onnx, tmp_path):
    report = compile_model(save_onnx(conv_bn_relu_model), tmp_path / "out.onnx", FP32).to_dict()

    assert (report["nodes_before"], report["nodes_after"]) == (6, 4)
    assert [p["name"] for p in report["passes"]] == [s.name for s in build_pipeline(FP32)]
    assert report["fusion"]["note"].startswith("folded 2 of 2")
    assert report["size_after"] == (tmp_path / "out.onnx").stat().st_size


def test_verify_checks_every_pass(conv_bn_relu_model, save_onnx, tmp_path):
    config = CompileConfig(quantize=False, verify=True)

    report = compile_model(save_onnx(conv_bn_relu_model), tmp_path / "out.onnx", config).to_dict()

    diffs = [p["max_abs_diff"] for p in report["passes"]]
    assert all(d is not None and d <= config.tolerance for d in diffs)


@pytest.mark.parametrize("wrong_pass", [ScaleConvWeightPass, NudgeConvWeightPass])
def test_verify_names_the_pass_that_breaks_numerics(
    wrong_pass, conv_bn_relu_model, save_onnx, tmp_path
):
    config = CompileConfig(quantize=False, verify=True)

    with pytest.raises(VerificationError, match=rf"pass {wrong_pass.__name__} \(user\)"):
        compile_model(
            save_onnx(conv_bn_relu_model),
            tmp_path / "out.onnx",
            config,
            extra_passes=[wrong_pass()],
        )
    assert not (tmp_path / "out.onnx").exists()


def test_without_verify_a_wrong_pass_goes_unnoticed(conv_bn_relu_model, save_onnx, tmp_path):
    # The counterpart of the test above: it is --verify that catches the pass.
    compile_model(
        save_onnx(conv_bn_relu_model),
        tmp_path / "out.onnx",
        FP32,
        extra_passes=[ScaleConvWeightPass()],
    )
    assert (tmp_path / "out.onnx").exists()


def test_fp32_output_that_onnx_runtime_refuses_is_not_written(
    conv_bn_relu_model, save_onnx, tmp_path
):
    with pytest.raises(
        VerificationError, match="compiled fp32 model not written: ONNX Runtime cannot load it"
    ):
        compile_model(
            save_onnx(conv_bn_relu_model),
            tmp_path / "out.onnx",
            FP32,
            extra_passes=[UnknownOpPass()],
        )
    assert not list(tmp_path.glob("out.onnx*"))


def test_fp32_if_returning_outer_values_compiles_to_a_model_ort_loads(
    build_onnx, save_onnx, tmp_path
):
    # Branches that return an Identity of a value computed outside them (the exporters of
    # real models write these): identity elimination must not make the branch return it.
    proto = build_onnx(
        """
        net (float[2,3] x, bool c) => (float[2,3] y) {
            a = Relu (x)
            b = Sigmoid (x)
            y = If (c) <
                then_branch = t () => (float[2,3] ty) { ty = Identity (a) },
                else_branch = e () => (float[2,3] ey) { ey = Identity (b) }
            >
        }
        """
    )
    out = tmp_path / "out.onnx"
    compile_model(save_onnx(proto), out, FP32)
    session = ort.InferenceSession(str(out))
    reference = ort.InferenceSession(proto.SerializeToString())
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        np.testing.assert_allclose(session.run(None, feeds)[0], reference.run(None, feeds)[0])


def test_int8_compile_of_a_minus_1_batch_model(save_onnx, tmp_path):
    # Older exporters write the dynamic batch as -1: it must not read as a static size.
    n = seeded(3)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 3, 6, 6])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [-1, 4, 6, 6])
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["a"], ["r"]),
        onnx.helper.make_node("Conv", ["r", "w2"], ["y"]),
    ]
    weights = [
        onnx.numpy_helper.from_array(n(4, 3, 3, 3), "w1"),
        onnx.numpy_helper.from_array(n(4, 4, 1, 1), "w2"),
    ]
    graph = onnx.helper.make_graph(nodes, "g", [x], [y], weights)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    np.savez(tmp_path / "calib.npz", x=n(10, 3, 6, 6))
    config = CompileConfig(calibration=str(tmp_path / "calib.npz"), check_latency=False)

    report = compile_model(save_onnx(proto), tmp_path / "out.onnx", config).to_dict()

    assert report["calibration"]["num_samples"] == 10
    assert report["quantized_nodes"]


def test_user_passes_run_after_fusion_and_are_exact_by_default():
    steps = build_pipeline(FP32, [NudgeConvWeightPass()])
    assert steps[-1].stage == "user" and steps[-1].name == "NudgeConvWeightPass"
    assert steps[-1].preserves_outputs
    assert {s.stage for s in steps[:-1]} == {"cleanup", "fuse"}


def test_user_pass_can_declare_itself_inexact():
    class Approximate(NudgeConvWeightPass):
        exact = False

    (step,) = [s for s in build_pipeline(FP32, [Approximate()]) if s.stage == "user"]
    assert not step.preserves_outputs


def test_failing_pass_is_a_compile_error_naming_it(conv_bn_relu_model, to_ir_model):
    steps = [*build_pipeline(FP32), Step("user", FailingPass(), "test")]

    with pytest.raises(CompileError, match=r"pass FailingPass failed: ZeroDivisionError: boom"):
        run_pipeline(to_ir_model(conv_bn_relu_model), steps)


def test_register_pass_lists_it_as_a_user_pass(user_registry):
    assert "ScaleConvWeightPass" not in available_passes()

    assert register_pass(ScaleConvWeightPass) is ScaleConvWeightPass

    stage, doc = available_passes()["ScaleConvWeightPass"]
    assert stage == "user"
    assert doc == "Multiplies the first Conv weight by a factor: a deliberately wrong user pass."


def test_available_passes_lists_the_builtin_ones(user_registry):
    found = available_passes()
    assert found["FoldBatchNormPass"][0] == "fuse"
    assert found["MarkFusedUnitsPass"][0] == "quantize"
    assert found["TopologicalSortPass"][0] == "cleanup"
    assert found["FoldBatchNormPass"][1] == FoldBatchNormPass.__doc__


@pytest.mark.parametrize("not_a_pass", [NotAPass, NotAPass(), "FoldBatchNormPass"])
def test_register_pass_refuses_other_objects(user_registry, not_a_pass):
    with pytest.raises(TypeError, match=r"not an onnx_ir\.passes\.PassBase subclass"):
        register_pass(not_a_pass)
    assert not user_registry


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """An importable module with a pass class, a non-pass and a non-callable."""
    (tmp_path / "my_user_passes.py").write_text(
        textwrap.dedent(
            """
            import onnx_ir as ir

            class Noop(ir.passes.InPlacePass):
                def call(self, model):
                    return ir.passes.PassResult(model, modified=False)

            class NotAPass:
                pass

            CONSTANT = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_user_passes"


def test_load_pass_instantiates_the_class(user_module):
    pass_ = load_pass(f"{user_module}:Noop")
    assert isinstance(pass_, ir.passes.PassBase)
    assert type(pass_).__name__ == "Noop"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("my_user_passes.Noop", "expected package.module:ClassName"),
        (":Noop", "expected package.module:ClassName"),
        ("my_user_passes:", "expected package.module:ClassName"),
        ("no_such_module_xyz:Noop", "cannot import 'no_such_module_xyz'"),
        ("my_user_passes:Missing", "'Missing' not found in module 'my_user_passes'"),
        ("my_user_passes:CONSTANT", "'CONSTANT' not found in module 'my_user_passes'"),
        ("my_user_passes:NotAPass", "did not produce an onnx_ir.passes.PassBase instance"),
    ],
)
def test_load_pass_errors(user_module, spec, message):
    with pytest.raises(InputError, match=message):
        load_pass(spec)


def test_every_step_says_why_and_the_report_keeps_it(conv_bn_relu_model, save_onnx, tmp_path):
    steps = build_pipeline(FP32)
    assert all(s.why and len(s.why) > 20 for s in steps)

    report = compile_model(save_onnx(conv_bn_relu_model), tmp_path / "out.onnx", FP32).to_dict()

    assert [p["why"] for p in report["passes"]] == [s.why for s in steps]


def test_fusion_report_survives_renaming_the_fold_pass(
    conv_bn_relu_model, save_onnx, tmp_path, monkeypatch
):
    class RenamedFold(FoldBatchNormPass):
        """The fold under another name: the report finds it by its result's type."""

    monkeypatch.setattr("onnxq.pipeline.FoldBatchNormPass", RenamedFold)

    report = compile_model(save_onnx(conv_bn_relu_model), tmp_path / "out.onnx", FP32)

    assert "RenamedFold" in [r.name for r in report.passes]
    assert report.fusion["note"].startswith("folded 2 of 2")


def test_compile_report_json_leaves_out_what_did_not_run(conv_bn_relu_model, save_onnx, tmp_path):
    report = compile_model(save_onnx(conv_bn_relu_model), tmp_path / "out.onnx", FP32)

    data = report.to_dict()

    assert data["kind"] == "compile"
    assert set(data) == {
        "kind", "input", "output", "config", "nodes_before", "nodes_after", "size_before",
        "size_after", "passes", "fusion", "sparsity",
    }  # fmt: skip
    assert "result" not in data["passes"][0]  # the pass result stays in memory


def test_old_opset_models_are_upgraded_first():
    (first, *_) = build_pipeline(FP32, opset=11)
    assert (first.stage, first.name) == ("cleanup", "UpgradeOpsetPass")
    assert all(s.name != "UpgradeOpsetPass" for s in build_pipeline(FP32, opset=13))


def test_quantizing_without_data_or_ranges_is_refused_when_building():
    with pytest.raises(InputError, match="static int8 needs calibration data"):
        build_pipeline(CompileConfig())


def test_pruning_steps_reset_the_verification_reference():
    steps = build_pipeline(CompileConfig(quantize=False, prune="channels:0.3"))
    prune = [s for s in steps if s.stage == "prune"]
    assert [s.name for s in prune] == ["PruneChannelsPass", "RemoveUnusedNodesPass"]
    assert all(s.resets_reference and not s.preserves_outputs for s in prune)
    assert not any(s.resets_reference for s in steps if s.stage != "prune")


def test_verify_does_not_import_the_pipeline():
    # verify.py used to import pipeline.Step (pipeline imports verify): a cycle.
    code = "import sys, onnxq.verify; print('onnxq.pipeline' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


def test_calibration_progress_reaches_the_callback(conv_bn_relu_model, save_onnx, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", x=seeded(4)(6, 3, 8, 8))
    config = CompileConfig(calibration=str(tmp_path / "calib.npz"), check_latency=False)
    calls = []

    compile_model(
        save_onnx(conv_bn_relu_model),
        tmp_path / "out.onnx",
        config,
        calibration_progress=lambda done, total: calls.append((done, total)),
    )

    assert calls and calls[-1] == (6, 6)
    assert [done for done, _ in calls] == sorted({done for done, _ in calls})
    assert "calibrating" not in capsys.readouterr().err  # the library draws nothing itself


def test_the_library_does_not_import_click():
    # UI (bars, echo) belongs to onnxq.cli; the engine reports through callbacks and logging.
    code = (
        "import sys, onnxq.compiler, onnxq.calibration.collect, onnxq.bench, onnxq.gate, "
        "onnxq.evaluate, onnxq.demo, onnxq.prune_search; print('click' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


def test_missing_calibration_data_names_no_flags():
    # The CLI says it with its flags (tests/cli/test_compile_int8_cli.py).
    with pytest.raises(InputError, match="static int8 needs calibration data") as error:
        build_pipeline(CompileConfig())
    assert "--" not in str(error.value)
