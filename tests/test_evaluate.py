from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from classifier_fixtures import dataset, softmax, weights, write_pair

from onnxq.errors import InputError
from onnxq.evaluate import FidelityAccumulator, evaluate, sqnr_db


def test_sqnr_db_known_values():
    assert sqnr_db(np.ones(4), np.ones(4)) == math.inf
    assert sqnr_db([1.0, 1.0], [1.0, 0.0]) == pytest.approx(10 * math.log10(2.0))
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf


def test_fidelity_accumulator_streams_like_one_shot():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((12, 5))
    cand = ref + 0.1 * rng.standard_normal(ref.shape)
    acc = FidelityAccumulator()
    for start in range(0, 12, 5):
        acc.update(ref[start : start + 5], cand[start : start + 5])
    res = acc.result()
    cos = np.dot(ref.ravel(), cand.ravel()) / np.linalg.norm(ref) / np.linalg.norm(cand)
    assert res["sqnr_db"] == pytest.approx(sqnr_db(ref, cand))
    assert res["cosine"] == pytest.approx(cos)
    assert res["max_abs_error"] == pytest.approx(np.abs(ref - cand).max())
    agree = np.mean(ref.argmax(-1) == cand.argmax(-1))
    assert res["top1_agreement"] == pytest.approx(agree)
    with pytest.raises(ValueError, match="shape"):
        acc.update(ref, cand[:3])


def test_fidelity_accumulator_rank1_has_no_agreement():
    acc = FidelityAccumulator()
    acc.update(np.ones(3), np.ones(3))
    assert acc.result()["top1_agreement"] is None
    assert acc.result()["cosine"] == pytest.approx(1.0)


def test_evaluate_matches_numpy(tmp_path):
    ref, cand, data = write_pair(tmp_path)
    result = evaluate(ref, cand, data, labels_key="y", batch_size=7)
    x, y = dataset()
    p_ref = softmax(x @ weights()[0] + weights()[1])
    p_cand = softmax(x @ weights(noise=0.05)[0] + weights(noise=0.05)[1])
    acc = result.accuracy
    assert acc["reference"]["top1"] == pytest.approx(np.mean(p_ref.argmax(1) == y))
    assert acc["candidate"]["top1"] == pytest.approx(np.mean(p_cand.argmax(1) == y))
    drop = 100 * (acc["reference"]["top1"] - acc["candidate"]["top1"])
    assert acc["top1_drop_points"] == pytest.approx(drop)
    assert result.fidelity["probs"]["sqnr_db"] == pytest.approx(sqnr_db(p_ref, p_cand), rel=1e-3)
    assert result.samples == len(y)
    assert result.per_layer is None


def test_evaluate_identical_models_is_exact(tmp_path):
    ref, _, data = write_pair(tmp_path)
    result = evaluate(ref, ref, data)
    assert result.accuracy is None
    assert result.min_sqnr_db == math.inf
    assert result.fidelity["probs"]["top1_agreement"] == 1.0


def test_evaluate_per_layer_sorted_worst_first(tmp_path):
    ref, cand, data = write_pair(tmp_path)
    layers = evaluate(ref, cand, data, per_layer=True).per_layer
    assert {r["tensor"] for r in layers} == {"xw", "logits"}
    assert layers[0]["sqnr_db"] <= layers[1]["sqnr_db"]
    x = dataset()[0]
    expected = sqnr_db(x @ weights()[0], x @ weights(noise=0.05)[0])
    assert next(r for r in layers if r["tensor"] == "xw")["sqnr_db"] == pytest.approx(
        expected, rel=1e-3
    )


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"z": np.zeros((4, 8), np.float32)}, "no array for model input"),
        ({"x": np.zeros((4, 7), np.float32)}, "axis 1 differs"),
        ({"x": np.zeros((4, 8, 1), np.float32)}, "rank"),
        ({"x": np.zeros((4, 8), np.int32)}, "dtype"),
        ({"x": np.zeros((4, 8), np.float32), "y": np.zeros(4, np.float32)}, "integer"),
        ({"x": np.zeros((4, 8), np.float32), "y": np.zeros(3, np.int64)}, "rows"),
    ],
)
def test_evaluate_rejects_bad_data(tmp_path, arrays, message):
    ref, cand, _ = write_pair(tmp_path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    labels = "y" if "y" in arrays else None
    with pytest.raises(InputError, match=message):
        evaluate(ref, cand, bad, labels_key=labels)


def test_evaluate_rejects_missing_files_and_output_mismatch(tmp_path):
    ref, cand, data = write_pair(tmp_path)
    with pytest.raises(InputError, match="no such data file"):
        evaluate(ref, cand, tmp_path / "missing.npz")
    other = onnx.load(cand)
    other.graph.output[0].name = "scores"
    other.graph.node[-1].output[0] = "scores"
    onnx.save(other, tmp_path / "renamed.onnx")
    with pytest.raises(InputError, match="share no output"):
        evaluate(ref, tmp_path / "renamed.onnx", data)


def test_wrong_labels_key_names_the_key(tmp_path):
    import numpy as np
    import pytest

    from onnxq.errors import InputError

    ref, cand, _ = write_pair(tmp_path)
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 8), np.float32), label=np.zeros(2, np.int64))
    with pytest.raises(InputError, match="no labels array 'nope'"):
        evaluate(ref, cand, path, labels_key="nope")
