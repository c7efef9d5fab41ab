"""Tests for onnxq/fidelity.py: views read from the graph, criteria that catch task failures."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graph_builders import build_model, seeded

from onnxq.errors import InputError
from onnxq.fidelity import FidelityCriteria, OutputView, load_metric, measure, plan_views

# A detection-style head: boxes in the hundreds packed with class probabilities.
PACKED_HEAD = """
head (float[1,8,16] f) => (float[1,7,16] y, float[1,10] logits) {
    [box] b = Conv <kernel_shape = [1]> (f, wb)
    [scale] s = Mul (b, stride)
    [cls] c = Conv <kernel_shape = [1]> (f, wc)
    [sig] p = Sigmoid (c)
    [cat] y = Concat <axis = 1> (s, p)
    [flat] g = Flatten (f)
    [fc] logits = Gemm <transB = 1> (g, wf)
}
"""


def _packed_head() -> ir.Model:
    normal = seeded(0)
    weights = {
        "wb": normal(4, 8, 1),
        "stride": np.array(200.0, np.float32),
        "wc": normal(3, 8, 1),
        "wf": normal(10, 128),
    }
    proto = onnx.shape_inference.infer_shapes(build_model(PACKED_HEAD, weights))
    return ir.serde.deserialize_model(proto)


def test_views_split_a_concat_output_into_its_parts():
    views = {v.label: v for v in plan_views(_packed_head())}
    assert set(views) == {"y", "y[:, 0:4]", "y[:, 4:7]", "logits"}
    assert views["y[:, 4:7]"].probability and not views["y[:, 0:4]"].probability
    assert views["logits"].scores and not views["y"].scores


def test_views_of_a_plain_output_are_the_output_alone():
    views = plan_views(_packed_head())
    assert [v for v in views if v.output == "logits"] == [OutputView("logits", scores=True)]


def _packed_runs(noise_on_probabilities: float) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(1)
    ref, cand = [], []
    for _ in range(4):
        boxes = rng.uniform(0, 640, (1, 4, 16))
        probs = 1 / (1 + np.exp(-3 * rng.standard_normal((1, 3, 16))))
        y = np.concatenate([boxes, probs], axis=1).astype(np.float32)
        noisy = y.copy()
        noisy[:, :4] += rng.normal(0, 0.5, (1, 4, 16))  # boxes: fine
        noisy[:, 4:] = np.clip(probs + rng.normal(0, noise_on_probabilities, probs.shape), 0, 1)
        ref.append({"y": y})
        cand.append({"y": noisy.astype(np.float32)})
    return ref, cand


def test_a_broken_small_part_fails_although_the_whole_output_passes():
    views = [v for v in plan_views(_packed_head()) if v.output == "y"]
    ref, cand = _packed_runs(noise_on_probabilities=0.3)
    result = measure(ref, cand, views, FidelityCriteria())
    by_view = {(c.view, c.kind): c for c in result.checks}
    assert by_view[("y", "sqnr_db")].passed  # the boxes' energy hides the broken scores
    assert not result.passed
    assert {c.view for c in result.failures} == {"y[:, 4:7]"}


def test_a_packed_output_with_small_noise_passes():
    views = [v for v in plan_views(_packed_head()) if v.output == "y"]
    ref, cand = _packed_runs(noise_on_probabilities=0.002)
    assert measure(ref, cand, views, FidelityCriteria()).passed


def _heatmaps(shift: float) -> tuple[list[dict], list[dict]]:
    """Smooth [0, 1] maps; the candidate pushes values near 0.8 across the threshold."""
    yy, xx = np.mgrid[0:32, 0:32]
    ref, cand = [], []
    for cx in (10, 16, 22):
        heat = np.exp(-((yy - 16) ** 2 + (xx - cx) ** 2) / 60.0)[None].astype(np.float32)
        near = np.abs(heat - 0.8) < 0.08
        moved = np.where(near, heat - shift, heat).astype(np.float32)
        ref.append({"map": heat})
        cand.append({"map": moved})
    return ref, cand


def test_thresholded_map_iou_catches_what_sqnr_misses():
    ref, cand = _heatmaps(shift=0.09)
    result = measure(ref, cand, [OutputView("map")], FidelityCriteria())
    kinds = {c.kind: c for c in result.checks}
    assert kinds["sqnr_db"].passed and kinds["sqnr_db"].value > 20
    assert not kinds["iou@0.8"].passed and kinds["iou@0.8"].value < 0.9
    assert kinds["iou@0.3"].passed and kinds["iou@0.5"].passed


def test_thresholded_map_with_small_noise_passes():
    ref, cand = _heatmaps(shift=0.001)
    assert measure(ref, cand, [OutputView("map")], FidelityCriteria()).passed


def test_empty_thresholded_sets_are_not_judged():
    ref = [{"map": np.full((1, 8, 8), 0.1, np.float32)}]
    cand = [{"map": np.full((1, 8, 8), 0.1, np.float32)}]
    kinds = {c.kind for c in measure(ref, cand, [OutputView("map")], FidelityCriteria()).checks}
    assert kinds == {"sqnr_db"}


def _scores(flips: int, rows: int = 32) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((rows, 10)).astype(np.float32)
    cand = ref.copy()
    for row in range(flips):
        top = int(np.argmax(ref[row]))
        cand[row, (top + 1) % 10] = ref[row, top] + 1.0
    return [{"logits": ref}], [{"logits": cand}]


@pytest.mark.parametrize(("flips", "passed"), [(0, True), (1, True), (3, False)])
def test_top1_agreement_allows_for_sampling_error_only(flips, passed):
    ref, cand = _scores(flips)
    view = OutputView("logits", scores=True)
    checks = {c.kind: c for c in measure(ref, cand, [view], FidelityCriteria()).checks}
    assert checks["top1_agreement"].value == pytest.approx(1 - flips / 32)
    assert checks["top1_agreement"].passed is passed


def test_runs_are_compared_as_the_model_ran_them():
    # Two runs of different shapes (no sample axis to concatenate on) are fine.
    ref = [{"y": np.ones((1, 3), np.float32)}, {"y": np.ones((5,), np.float32)}]
    result = measure(ref, ref, [OutputView("y")], FidelityCriteria())
    assert result.passed and result.runs == 2


def test_user_metric_gets_lists_per_run_and_decides():
    seen = {}

    def metric(reference, candidate):
        seen["runs"] = len(reference["y"])
        return False, 0.25

    ref = [{"y": np.ones((2, 3), np.float32)}] * 3
    result = measure(ref, ref, [OutputView("y")], FidelityCriteria(metric=metric))
    assert seen["runs"] == 3
    assert not result.passed and result.failures[0].kind == "metric"
    assert result.failures[0].value == 0.25


def test_user_metric_returning_something_else_is_an_input_error():
    ref = [{"y": np.ones((2, 3), np.float32)}]
    criteria = FidelityCriteria(metric=lambda r, c: "yes", metric_name="m:f")
    with pytest.raises(InputError, match="m:f returned str"):
        measure(ref, ref, [OutputView("y")], criteria)


def test_load_metric_errors_name_the_problem():
    with pytest.raises(InputError, match=r"expected package.module:function"):
        load_metric("nocolon")
    with pytest.raises(InputError, match="cannot import"):
        load_metric("no_such_module_xyz:f")
    assert load_metric("math:isclose") is not None


def test_integer_outputs_must_match_exactly():
    labels = np.arange(64, dtype=np.int64)
    wrong = labels.copy()
    wrong[:5] = 0
    view = [OutputView("labels")]
    assert measure([{"labels": labels}], [{"labels": labels}], view, FidelityCriteria()).passed
    result = measure([{"labels": labels}], [{"labels": wrong}], view, FidelityCriteria())
    assert not result.passed and result.failures[0].kind == "equal"


def test_whole_outputs_report_their_metrics():
    ref, cand = _heatmaps(shift=0.001)
    result = measure(ref, cand, [OutputView("map")], FidelityCriteria())
    assert result.to_dict()["outputs"]["map"]["sqnr_db"] == result.min_sqnr_db


def test_top1_agreement_on_millions_of_rows_does_not_overflow():
    # Token- or pixel-level class outputs give millions of rows; the binomial tail must
    # still be computed (it overflowed a float through math.comb).
    from onnxq.fidelity import _agreement_plausible

    assert _agreement_plausible(100, 2_000_000, 0.99)
    assert not _agreement_plausible(40_000, 2_000_000, 0.99)


def test_thresholded_iou_is_judged_per_run_not_only_pooled():
    # Run 1 has a large region kept exactly; run 2's small region moves entirely. The
    # pooled IoU is high (run 1 dominates), but one input's region of interest is lost.
    big = np.zeros((1, 64, 64), np.float32)
    big[0, :48, :48] = 0.9
    small_ref = np.zeros((1, 64, 64), np.float32)
    small_ref[0, :4, :4] = 0.9
    small_cand = np.zeros((1, 64, 64), np.float32)
    small_cand[0, 60:, 60:] = 0.9
    ref = [{"heat": big}, {"heat": small_ref}]
    cand = [{"heat": big}, {"heat": small_cand}]
    view = OutputView("heat", probability=True)
    pooled_only = (48 * 48) / (48 * 48 + 32)
    assert pooled_only > 0.9  # what a pooled count alone would have said
    checks = measure(ref, cand, [view], FidelityCriteria(min_sqnr=-100.0)).checks
    iou = next(c for c in checks if c.kind == "iou@0.8")
    assert iou.value == pytest.approx(0.5) and not iou.passed


def test_thresholded_iou_passes_when_every_run_keeps_its_region():
    heat = np.zeros((1, 64, 64), np.float32)
    heat[0, 10:30, 10:30] = 0.9
    runs = [{"heat": heat}, {"heat": np.roll(heat, 5, axis=1)}]
    result = measure(runs, runs, [OutputView("heat", probability=True)], FidelityCriteria())
    assert result.passed


def _scores_runs(error_on_one: float, runs: int = 16):
    rng = np.random.default_rng(0)
    ref = [
        {"mos": (3.0 + 0.5 * rng.standard_normal((1, 3))).astype(np.float32)} for _ in range(runs)
    ]
    cand = [{"mos": r["mos"].copy()} for r in ref]
    cand[3]["mos"][0, 1] += error_on_one
    return ref, cand


def test_small_regression_output_error_is_judged_against_its_spread():
    # A quality score off by 0.3 on one input: about 40 dB against the scores' size (the
    # whole-output SQNR passes), but far off against a spread of 0.5 between inputs.
    ref, cand = _scores_runs(0.3)
    result = measure(ref, cand, [OutputView("mos")], FidelityCriteria())
    kinds = {c.kind: c for c in result.checks}
    assert kinds["sqnr_db"].passed
    assert not kinds["worst_error"].passed
    assert not result.passed


def test_small_regression_output_with_small_errors_passes():
    ref, cand = _scores_runs(0.01)
    result = measure(ref, cand, [OutputView("mos")], FidelityCriteria())
    kinds = {c.kind for c in result.checks}
    assert {"spread_sqnr_db", "worst_error"} <= kinds
    assert result.passed


def test_large_outputs_and_few_runs_get_no_spread_check():
    ref, cand = _scores_runs(0.3, runs=4)  # too few runs to know the spread
    assert not any(
        c.kind == "spread_sqnr_db"
        for c in measure(ref, cand, [OutputView("mos")], FidelityCriteria()).checks
    )
    big = [{"y": np.full((1, 64), float(i), np.float32)} for i in range(16)]
    assert not any(
        c.kind == "spread_sqnr_db"
        for c in measure(big, big, [OutputView("y")], FidelityCriteria()).checks
    )


def test_a_barely_passing_result_is_not_comfortable():
    from onnxq.fidelity import Check, FidelityResult

    barely = FidelityResult([Check("y", "sqnr_db", 20.5, 20.0, True)], 1)
    roomy = FidelityResult([Check("y", "sqnr_db", 21.5, 20.0, True)], 1)
    tight_iou = FidelityResult([Check("m", "iou@0.8", 0.91, 0.9, True)], 1)
    tight_worst = FidelityResult([Check("s", "worst_error", 0.09, 0.1, True)], 1)
    assert barely.passed and not barely.comfortable
    assert roomy.comfortable and not tight_iou.comfortable and not tight_worst.comfortable


def test_small_score_heads_get_the_spread_check_too():
    # A Dense head of three quality scores looks like logits; it is still judged as numbers.
    ref, cand = _scores_runs(0.3)
    result = measure(ref, cand, [OutputView("mos", scores=True)], FidelityCriteria())
    assert any(c.kind == "worst_error" and not c.passed for c in result.checks)


def _anchor_scores(
    moved_runs: int,
    runs: int = 32,
    *,
    top: float = 0.8,
    margins: tuple[float, ...] = (0.1,),
    error: float = 0.0,
):
    """Detector-like score maps: one confident anchor among 1000 and a second object.

    The second object scores ``top`` minus the run's margin (cycling over ``margins``);
    the candidate swaps the two in the first ``moved_runs`` runs and lowers both by
    ``error`` (alike: the order, and so the peak, holds).
    """
    ref, cand = [], []
    for i in range(runs):
        r = np.full((1, 1, 1000), 0.01, np.float32)
        r[0, 0, 100 + i] = top
        r[0, 0, 500 + i] = top - margins[i % len(margins)]
        c = r.copy()
        if i < moved_runs:  # int8 now ranks the second object first
            c[0, 0, 100 + i], c[0, 0, 500 + i] = r[0, 0, 500 + i], r[0, 0, 100 + i]
        c[0, 0, 100 + i] -= error
        c[0, 0, 500 + i] -= error
        ref.append({"scores": r})
        cand.append({"scores": c})
    return ref, cand


def test_a_detectors_top_anchor_must_stay_where_fp32_has_it():
    ref, cand = _anchor_scores(moved_runs=5)
    result = measure(ref, cand, [OutputView("scores", probability=True)], FidelityCriteria())
    peak = next(c for c in result.checks if c.kind == "peak_agreement")
    assert peak.value == pytest.approx(27 / 32) and not peak.passed


def test_peak_check_passes_when_the_top_anchor_stays_and_skips_dense_maps():
    ref, cand = _anchor_scores(moved_runs=0)
    result = measure(ref, cand, [OutputView("scores", probability=True)], FidelityCriteria())
    assert result.passed and any(c.kind == "peak_agreement" for c in result.checks)
    # A map with a large confident region is judged by its thresholded sets, not its peak.
    dense = np.zeros((1, 40, 40), np.float32)
    dense[0, 5:25, 5:25] = 0.9
    moved = dense.copy()
    moved[0, 6, 6] = 1.0
    runs_ref, runs_cand = [{"m": dense}] * 4, [{"m": moved}] * 4
    checks = measure(runs_ref, runs_cand, [OutputView("m", probability=True)], FidelityCriteria())
    assert not any(c.kind == "peak_agreement" for c in checks.checks)


def test_wide_class_logit_heads_are_judged_by_agreement_not_spread():
    rng = np.random.default_rng(1)
    ref = [{"logits": rng.standard_normal((1, 10)).astype(np.float32)} for _ in range(20)]
    cand = [{"logits": r["logits"] + 0.5} for r in ref]  # same argmax everywhere
    result = measure(ref, cand, [OutputView("logits", scores=True)], FidelityCriteria())
    assert not any(c.kind in ("spread_sqnr_db", "worst_error") for c in result.checks)


def test_one_moved_peak_in_32_runs_fails_the_default_floor():
    ref, cand = _anchor_scores(moved_runs=1)
    result = measure(ref, cand, [OutputView("scores", probability=True)], FidelityCriteria())
    assert any(c.kind == "peak_agreement" and not c.passed for c in result.checks)


def _near_tie_runs(error: float, runs: int = 32):
    """Two similar objects per run, fp32 margins 1e-3..4e-3; the candidate keeps every peak."""
    return _anchor_scores(0, runs, top=0.9, margins=(1e-3, 2e-3, 3e-3, 4e-3), error=error)


def test_a_peak_decided_by_less_than_the_candidates_error_is_unstable():
    # Every check run keeps its peak, but the error (5e-3) exceeds every fp32 margin: on
    # an input as near a tie, with errors not aligned, the top object flips.
    ref, cand = _near_tie_runs(error=5e-3)
    result = measure(ref, cand, [OutputView("scores", probability=True)], FidelityCriteria())
    checks = {c.kind: c for c in result.checks}
    assert checks["peak_agreement"].passed
    assert checks["peak_stability"].value == pytest.approx(0.0)
    assert not result.passed


def test_a_peak_with_margins_above_the_error_is_stable():
    ref, cand = _near_tie_runs(error=2e-4)  # below the smallest margin (1e-3)
    result = measure(ref, cand, [OutputView("scores", probability=True)], FidelityCriteria())
    stability = next(c for c in result.checks if c.kind == "peak_stability")
    assert stability.value == pytest.approx(1.0) and stability.passed


def test_peak_stability_counts_the_pairs_whose_margin_the_error_covers():
    # margins 1e-3 and 4e-3, errors 2e-3 and 0: one of four pairs flips.
    ref, cand = [], []
    for margin, error in ((1e-3, 2e-3), (4e-3, 0.0)):
        r = np.full((1, 1, 1000), 0.01, np.float64)
        r[0, 0, 10], r[0, 0, 20] = 0.9, 0.9 - margin
        c = r.copy()
        c[0, 0, 10] -= error
        c[0, 0, 20] -= error
        ref.append({"scores": r})
        cand.append({"scores": c})
    result = measure(ref, cand, [OutputView("scores", probability=True)], FidelityCriteria())
    stability = next(c for c in result.checks if c.kind == "peak_stability")
    assert stability.value == pytest.approx(0.75)


def test_agreement_plausibility_matches_the_exact_binomial_tail():
    from onnxq.fidelity import _agreement_plausible

    def exact(d, n, a):
        p = 1.0 - a
        return 1.0 - sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(d)) >= 0.05

    for n in (1, 7, 32, 200):
        for a in (0.9, 0.99, 0.999):
            for d in range(n + 1):
                assert _agreement_plausible(d, n, a) == exact(d, n, a), (d, n, a)
    # Per-pixel outputs: a hundred million rows, decided from the tail near the mean.
    assert _agreement_plausible(1_000_100, 100_000_000, 0.99)  # 0.1 sigma above the mean
    assert not _agreement_plausible(1_010_000, 100_000_000, 0.99)  # 10 sigma above
