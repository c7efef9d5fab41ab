from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from graph_builders import fusing_model
from PIL import Image

from onnxq.calibration import data as data_module
from onnxq.calibration.collect import collect_stats
from onnxq.calibration.data import ImagePreprocess, open_calibration_data
from onnxq.calibration.sharded import collect_stats_sharded, shard_bounds
from onnxq.calibration.stats import METHODS, TensorStats, compute_range, merge_stats
from onnxq.errors import CompileError
from onnxq.executor import LocalExecutor, make_executor


class _InProcess(LocalExecutor):
    """Shards run one after another in this process, as on three workers."""

    workers = 3


@pytest.fixture
def net() -> ir.Model:
    return ir.serde.deserialize_model(fusing_model())


@pytest.fixture
def data_file(tmp_path):
    """Samples whose scale grows and jumps, so the histograms widen and shift mid-way."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 4, 8, 8)).astype(np.float32)
    x *= (1.6 ** (np.arange(37) % 11))[:, None, None, None].astype(np.float32)
    x[20:24] += 40.0
    np.savez(tmp_path / "calib.npz", x=x)
    return tmp_path / "calib.npz"


def _ranges(stats: dict[str, TensorStats]) -> dict[tuple[str, str], tuple[float, float]]:
    return {(m, n): compute_range(s, m) for m in METHODS for n, s in stats.items()}


def _same_state(a: TensorStats, b: TensorStats) -> bool:
    fields = ("count", "zero_count", "min", "max", "exponent", "offset")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and np.array_equal(a.hist, b.hist)


def test_shard_bounds_cover_every_batch_once():
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, None)]
    assert shard_bounds(2, 5) == [(0, 1), (1, None)]


@pytest.mark.parametrize("seed", range(5))
def test_merged_parts_are_one_pass_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-3, 3, size=30)
    batches = [(rng.standard_normal(64) * s + rng.normal() * s).astype(np.float32) for s in scales]
    batches[5] = np.maximum(batches[5], 0)  # a spike of zeros, as after Relu
    one = TensorStats(256)
    for b in batches:
        one.update(b)
    cuts = [0, *sorted(rng.choice(np.arange(1, 30), size=3, replace=False)), 30]
    parts = []
    for lo, hi in itertools.pairwise(cuts):
        part = TensorStats(256, mergeable=True)
        for b in batches[lo:hi]:
            part.update(b)
        parts.append(part)
    merged = merge_stats(parts)
    assert _same_state(merged, one)
    assert _ranges({"t": merged}) == _ranges({"t": one})
    # Merging is associative: merged merges again.
    assert _same_state(merge_stats([merge_stats(parts[:2]), merge_stats(parts[2:])]), one)


def test_merge_keeps_the_width_a_constant_first_batch_chose(caplog):
    # A constant first batch gets a finer width than the overall range needs; one pass
    # keeps it (the range still fits), and so must the merge.
    rng = np.random.default_rng(0)
    batches = [np.full(8, 1.0, np.float32)]
    batches += [(1 + 5e-6 * rng.random(64)).astype(np.float32) for _ in range(6)]
    one = TensorStats(256)
    for b in batches:
        one.update(b)
    parts = [TensorStats(256, mergeable=True) for _ in range(3)]
    for i, b in enumerate(batches):
        parts[min(i // 3, 2)].update(b)
    merged = merge_stats(parts)
    assert "not exactly" not in caplog.text  # exact, not widened to the coarsest part
    assert merged.exponent == one.exponent == -24
    assert _same_state(merged, one)
    assert _ranges({"t": merged}) == _ranges({"t": one})


def test_merge_refuses_parts_not_made_mergeable():
    part = TensorStats(16)
    part.update(np.arange(4, dtype=np.float32))
    with pytest.raises(ValueError, match="mergeable"):
        merge_stats([part])


def test_shards_computed_in_any_order_merge_to_one_pass(net, data_file):
    data = open_calibration_data(data_file, net, batch_size=4)
    one = collect_stats(net, data)
    bounds = shard_bounds(data.num_batches, 4)
    shards = {}
    for index in (2, 0, 3, 1):  # finishing in any order; merged in the data's order
        shards[index] = collect_stats(net, data, shard=bounds[index], mergeable=True)
    merged = {n: merge_stats([shards[i][n] for i in range(4)]) for n in one}
    assert all(_same_state(merged[n], one[n]) for n in one)
    assert _ranges(merged) == _ranges(one)


@pytest.mark.parametrize("max_memory", [None, 160_000])
def test_sharded_collect_gives_the_one_pass_ranges(net, data_file, max_memory):
    data = open_calibration_data(data_file, net, batch_size=4)
    plans = []
    one = collect_stats(net, data, max_memory=max_memory, on_plan=plans.append)
    sharded = collect_stats_sharded(net, data, _InProcess(), max_memory=max_memory)
    assert sharded.shards == 3 and sharded.samples == 37
    assert _ranges(sharded.stats) == _ranges(one)
    if max_memory is not None:  # the budget split the data's batches into smaller runs
        assert plans[0].batch_size < 4


def test_pool_of_two_workers_gives_the_one_pass_ranges(net, data_file):
    data = open_calibration_data(data_file, net, batch_size=4)
    one = collect_stats(net, data)
    seen = []
    with make_executor("local", 2) as executor:
        sharded = collect_stats_sharded(
            net, data, executor, progress=lambda done, total: seen.append((done, total))
        )
    assert sharded.shards == 2
    assert _ranges(sharded.stats) == _ranges(one)
    assert seen[-1] == (37, 37)


def test_a_shard_names_the_bad_sample_counting_from_the_data_start(text_model, tmp_path):
    model = text_model(
        """
        g (float[N, 2] x) => (float[N, 2] y) {
          y = Log(x)
        }
        """
    )
    x = np.ones((12, 2), np.float32)
    x[9, 1] = -1.0  # log(-1) is NaN: in the second shard
    np.savez(tmp_path / "c.npz", x=x)
    data = open_calibration_data(tmp_path / "c.npz", model, batch_size=3)
    with pytest.raises(CompileError, match="batch starting at sample 9"):
        collect_stats_sharded(model, data, _InProcess())


def _image_folder(folder, sizes) -> list[int]:
    """One image per size (width, height); returns the samples of each file, in order."""
    rng = np.random.default_rng(5)
    for i, (width, height) in enumerate(sizes):
        array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img{i:02d}.png")
    return [1] * len(sizes)


def _array_folder(folder, counts, suffix) -> list[int]:
    """Files of ``counts`` samples each, scaled apart; returns ``counts``."""
    rng = np.random.default_rng(6)
    for i, count in enumerate(counts):
        x = (rng.standard_normal((count, 4)) * (i + 1)).astype(np.float32)
        if suffix == "npz":
            np.savez(folder / f"part{i:02d}.npz", x=x)
        else:
            np.save(folder / f"part{i:02d}.npy", x)
    return counts


# (kind, what each file holds): images of one size (cropped) or of sizes that change
# mid-batch (a batch ends early there); npz/npy files of 1 to 5 samples each.
_SIZES = [(8, 8)] * 3 + [(10, 6)] * 3 + [(8, 8)] * 4
_FOLDERS = {
    "images, cropped": lambda d: _image_folder(d, [(12, 10)] * 10),
    "images, sizes change": lambda d: _image_folder(d, _SIZES),
    "npz files": lambda d: _array_folder(d, [3, 1, 5, 2, 4, 1, 2], "npz"),
    "npy files": lambda d: _array_folder(d, [2, 4, 1, 3, 5, 2], "npy"),
}


@pytest.mark.parametrize("kind", list(_FOLDERS))
def test_a_shard_decodes_only_its_own_files_and_merges_to_one_pass(
    kind, tmp_path, text_model, monkeypatch
):
    counts = _FOLDERS[kind](tmp_path)
    if kind.startswith("images"):
        model = text_model(
            """
            g (float[N, 3, H, W] x) => (float[N, 3] y) {
              r = Relu(x)
              y = ReduceMean <axes = [2, 3], keepdims = 0> (r)
            }
            """
        )
        pre = ImagePreprocess(crop=8 if kind == "images, cropped" else None)
        data = open_calibration_data(tmp_path, model, batch_size=2, preprocess=pre)
        decoding = (ImagePreprocess, "apply", lambda self, path: path)
    else:
        model = text_model("g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }")
        data = open_calibration_data(tmp_path, model, batch_size=3)
        decoding = (data_module, "_open_stream", lambda path, member=None: path)
    files = sorted(p.name for p in tmp_path.iterdir())  # as the folder source lists them
    owner = [name for name, count in zip(files, counts, strict=True) for _ in range(count)]
    whole = list(data.batches())
    one = collect_stats(model, data)
    # Record which files each read decodes (after opening, which reads headers only).
    where, attr, path_of = decoding
    original = getattr(where, attr)
    decoded: list[str] = []

    def counting(*args, **kwargs):
        decoded.append(Path(path_of(*args, **kwargs)).name)
        return original(*args, **kwargs)

    monkeypatch.setattr(where, attr, counting)
    bounds = shard_bounds(data.num_batches, 3)
    assert len(bounds) == 3
    shards = []
    for start, stop in bounds:
        decoded.clear()
        shards.append(collect_stats(model, data, shard=(start, stop), mergeable=True))
        first = whole[start].first
        end = whole[stop].first if stop is not None else len(owner)
        assert decoded == list(dict.fromkeys(owner[first:end])), (start, stop)
    merged = {n: merge_stats([s[n] for s in shards]) for n in one}
    assert all(_same_state(merged[n], one[n]) for n in one)
    assert _ranges(merged) == _ranges(one)
