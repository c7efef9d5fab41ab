"""compile_model opens its calibration data once, and decodes each sample once when it fits."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from graph_builders import fusing_model, seeded

from onnxq.calibration import data as data_module
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig

SAMPLES, CHECKED = 48, 16  # 48 samples of 4x8x8 float32: 48 KB of data


@pytest.fixture
def files(tmp_path):
    onnx.save(fusing_model(), tmp_path / "net.onnx")
    np.savez(tmp_path / "calib.npz", x=seeded(1)(SAMPLES, 4, 8, 8))
    return tmp_path


@pytest.fixture
def reads(files, monkeypatch) -> collections.Counter:
    """Opens of calib.npz, and the samples decoded from it, during the test."""
    calib = str(files / "calib.npz")
    counts: collections.Counter = collections.Counter()
    make, chunks = data_module._make_source, data_module._ArraySource.chunks

    def counting_make(spec, *args, **kwargs):
        counts["opens"] += str(spec) == calib
        return make(spec, *args, **kwargs)

    def counting_chunks(self, rows, start=0):
        for arrays, where in chunks(self, rows, start):
            if self.label == calib:
                counts["decoded"] += len(next(iter(arrays.values())))
            yield arrays, where

    monkeypatch.setattr(data_module, "_make_source", counting_make)
    monkeypatch.setattr(data_module._ArraySource, "chunks", counting_chunks)
    return counts


def _compile(files, **settings):
    config = CompileConfig(
        calibration=str(files / "calib.npz"),
        verify_samples=CHECKED,
        check_latency=False,
        tune_budget=0,
        **settings,
    )
    return compile_model(files / "net.onnx", files / "out.onnx", config).to_dict()


def test_static_int8_opens_the_data_once_and_decodes_each_sample_once(files, reads):
    report = _compile(files, calibration_method="entropy")
    assert report["calibration"]["num_samples"] == SAMPLES
    assert report["fidelity"]["samples"] == CHECKED
    # Calibration read every sample; the fidelity check ran on the first ones, held.
    assert reads == {"opens": 1, "decoded": SAMPLES}


def test_a_sample_limit_holds_the_samples_calibration_read(files, reads):
    _compile(files, max_samples=32)
    assert reads == {"opens": 1, "decoded": 32}


def test_dynamic_int8_reads_only_the_checked_samples(files, reads):
    report = _compile(files, mode="dynamic")
    assert report["fidelity"]["samples"] == CHECKED
    assert reads == {"opens": 1, "decoded": CHECKED}


def test_data_too_large_for_its_share_of_the_budget_stays_streamed(files, reads):
    # 200 KB: an eighth is 25 KB, less than the 48 KB of data, which is never held whole.
    report = _compile(files, max_memory="200KB")
    passes = report["calibration"]["memory"]["passes"]
    assert reads == {"opens": 1, "decoded": SAMPLES * passes + CHECKED}
