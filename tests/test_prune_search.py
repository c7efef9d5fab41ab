"""Sparsity search within a top-1 budget: the library call and ``compile --prune KIND:auto``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_builders import build_model, seeded

from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.errors import EXIT_USAGE, InputError
from onnxq.evaluate import evaluate
from onnxq.executor import make_executor
from onnxq.prune_search import is_auto, search_sparsity

SAMPLES = 200


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Conv(8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(10), its eval and calib data.

    The labels are the fp32 model's own argmax, so fp32 top-1 is exactly 100%.
    """
    folder = tmp_path_factory.mktemp("classifier")
    normal = seeded(11)
    model = build_model(
        """
        net (float[N,3,8,8] x) => (float[N,10] y) {
            [conv] c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            [relu] r = Relu (c)
            [pool] p = GlobalAveragePool (r)
            [flat] f = Flatten (p)
            [head] y = Gemm <transB = 1> (f, w2, b2)
        }
        """,
        {
            "w": normal(8, 3, 3, 3, scale=0.5),
            "b": normal(8, scale=0.2),
            "w2": normal(10, 8),
            "b2": normal(10, scale=0.1),
        },
    )
    path = folder / "classifier.onnx"
    onnx.save(model, path)
    # A per-sample colour shift survives the global pooling: the labels depend on the input.
    x = normal(SAMPLES, 3, 8, 8, scale=0.3) + normal(SAMPLES, 3, 1, 1, scale=2.0)
    (scores,) = ort.InferenceSession(str(path)).run(None, {"x": x})
    data = folder / "eval.npz"
    np.savez(data, x=x, label=np.argmax(scores, axis=1).astype(np.int64))
    calib = folder / "calib.npz"
    np.savez(calib, x=normal(32, 3, 8, 8))
    return path, data, calib


def _drop(model: Path, data: Path, spec: str, tmp_path: Path) -> float:
    """Recompiles ``spec`` independently of the search and measures its top-1 drop."""
    pruned = tmp_path / "check.onnx"
    compile_model(model, pruned, CompileConfig(quantize=False, prune=spec))
    return evaluate(model, pruned, data, labels_key="label").accuracy["top1_drop_points"]


def test_generous_budget_prunes_and_respects_it(classifier, tmp_path):
    model, data, _ = classifier

    result = search_sparsity(model, "channels:auto", data, "label", 20.0, CompileConfig())

    assert result.sparsity > 0
    assert result.spec == f"channels:{result.sparsity:g}"
    assert result.accuracy_fp32 == 1.0
    assert result.drop_points <= 20.0
    assert _drop(model, data, result.spec, tmp_path) == pytest.approx(result.drop_points)
    # Bisection from the middle of [0, 0.9], one candidate per step, the best is one of them.
    assert len(result.tried) == 6 and result.tried[0][0] == 0.45
    assert (result.sparsity, result.accuracy_pruned) in result.tried
    assert all(s <= result.sparsity for s, top1 in result.tried if 100 * (1 - top1) <= 20.0)


def test_zero_budget_keeps_predictions(classifier, tmp_path):
    model, data, _ = classifier

    result = search_sparsity(model, "channels:auto:l2", data, "label", 0.0, CompileConfig())

    assert result.drop_points == 0.0
    assert len(result.tried) == 6
    if result.spec is not None:  # only sparsities that remove no channel of 8 fit
        assert _drop(model, data, result.spec, tmp_path) == 0.0


def test_nothing_fits_means_no_pruning_and_a_warning(classifier, caplog):
    model, data, _ = classifier

    with caplog.at_level(logging.WARNING, logger="onnxq.prune_search"):
        result = search_sparsity(
            model, "channels:auto", data, "label", 0.0, CompileConfig(), low=0.4, steps=3
        )

    assert result.sparsity == 0.0 and result.spec is None
    assert result.accuracy_pruned == result.accuracy_fp32 and result.drop_points == 0.0
    assert [s for s, _ in result.tried] == [0.65, 0.525, 0.4625]
    assert all(top1 < 1.0 for _, top1 in result.tried)
    assert "not pruned" in caplog.text


@pytest.mark.parametrize(
    ("spec", "labels", "budget", "bounds", "fragment"),
    [
        ("2:4", "label", 1.0, {}, "can only be searched"),
        ("channels:0.3", "label", 1.0, {}, "can only be searched"),
        ("channels:auto:l3", "label", 1.0, {}, "bad channels options"),
        ("channels:auto", "label", -1.0, {}, ">= 0 points"),
        ("channels:auto", "label", 1.0, {"high": 1.0}, "0 <= low < high < 1"),
        ("channels:auto", "label", 1.0, {"steps": 0}, "at least 1 step"),
        ("channels:auto", "", 1.0, {}, "needs labels"),
    ],
)
def test_bad_requests(classifier, spec, labels, budget, bounds, fragment):
    model, data, _ = classifier
    with pytest.raises(InputError, match=fragment):
        search_sparsity(model, spec, data, labels, budget, CompileConfig(), **bounds)


def test_is_auto():
    assert is_auto("channels:auto") and is_auto("unstructured:auto:global")
    assert not is_auto("channels:0.3") and not is_auto(None) and not is_auto("mask:auto.npz")


# ---------------------------------------------------------------------------- CLI


def test_cli_searches_then_compiles_int8(cli, classifier, tmp_path):
    model, data, calib = classifier
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"

    result = cli(
        "compile", model, "-o", out, "--prune", "channels:auto:compensate",
        "--max-accuracy-drop", "20", "--eval-data", data, "--labels", "label",
        "--calibration-data", calib, "--no-latency-check", "--report", report,
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    search = json.loads(report.read_text())["prune_search"]
    assert search["sparsity"] > 0 and search["drop_points"] <= 20.0
    assert len(search["tried"]) == 6
    line = next(line for line in result.output.splitlines() if line.startswith("prune search:"))
    assert f"channels:{search['sparsity']:g}:compensate (top-1 " in line and "<= 20 points" in line
    full = json.loads(report.read_text())
    assert full["config"]["prune"] == search["spec"]
    assert "PruneChannelsPass" in full["pruning"] and full["quantized_nodes"]


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--prune", "channels:auto", "--eval-data", "DATA", "--labels", "label"],
         "needs --max-accuracy-drop"),
        (["--prune", "channels:auto", "--max-accuracy-drop", "1"], "needs --eval-data"),
        (["--prune", "channels:auto", "--max-accuracy-drop", "1", "--eval-data", "DATA"],
         "needs --labels"),
        (["--prune", "channels:0.3", "--max-accuracy-drop", "1"], "only apply to --prune"),
        (["--eval-data", "DATA", "--labels", "label"], "only apply to --prune KIND:auto"),
        (["--prune", "channels:auto", "--max-accuracy-drop", "-1", "--eval-data", "DATA",
          "--labels", "label"], ">= 0 points"),
    ],
)  # fmt: skip
def test_cli_usage_errors(cli, classifier, tmp_path, flags, fragment):
    model, data, _ = classifier
    out = tmp_path / "out.onnx"
    flags = [str(data) if f == "DATA" else f for f in flags]

    result = cli("compile", model, "-o", out, "--no-quantize", *flags)

    assert result.exit_code == EXIT_USAGE, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("budget", ["nan", "inf", "101"])
def test_cli_refuses_a_budget_that_accepts_any_drop(cli, classifier, tmp_path, budget):
    model, data, _ = classifier
    out = tmp_path / "out.onnx"
    flags = ["--prune", "channels:auto", "--eval-data", data, "--labels", "label"]

    result = cli(
        "compile", model, "-o", out, "--no-quantize", *flags, "--max-accuracy-drop", budget
    )

    assert result.exit_code == EXIT_USAGE, result.output
    assert "accuracy budget must be >= 0 points" in result.stderr
    assert not out.exists()


def test_a_fitting_sparsity_that_removes_nothing_is_said_and_not_returned(caplog):
    from onnxq.prune_search import _result

    tried = [(0.45, 0.9), (0.225, 0.95), (0.1125, 0.95)]
    with caplog.at_level(logging.WARNING, logger="onnxq.prune_search"):
        result = _result(tried, 0.95, 0.0, lambda s: f"channels:{s:g}", {0.225, 0.1125})
    assert result.spec is None and result.sparsity == 0.0
    assert "removes nothing" in caplog.text
    # When the chosen sparsity did remove channels, it is returned as before.
    kept = _result(tried, 0.95, 0.0, lambda s: f"channels:{s:g}", {0.1125})
    assert kept.spec == "channels:0.225"


def test_zero_budget_search_never_returns_a_spec_that_prunes_nothing(classifier):
    model, data, _ = classifier
    result = search_sparsity(model, "channels:auto:l2", data, "label", 0.0, CompileConfig())
    # Whatever fits a zero budget on this 8-channel net removes no channel: said, not kept.
    assert result.spec is None and result.sparsity == 0.0


def test_points_ahead_are_the_next_steps_of_the_bisection_fits_side_first():
    from onnxq.prune_search import _points_ahead

    assert _points_ahead(0.0, 0.9, 1) == [0.45]
    assert _points_ahead(0.0, 0.9, 4) == [0.45, 0.675, 0.225, 0.7875]


def test_a_pool_of_two_workers_finds_the_sequential_sparsity(classifier):
    model, data, _ = classifier
    args = (model, "channels:auto", data, "label", 20.0, CompileConfig())
    sequential = search_sparsity(*args, steps=4)
    with make_executor("local", 2) as executor:
        parallel = search_sparsity(*args, steps=4, executor=executor)
    assert parallel.to_dict() == sequential.to_dict()
    # The walk went both ways: a point fit and a point did not.
    assert len({100 * (1 - top1) <= 20.0 for _, top1 in sequential.tried}) == 2
