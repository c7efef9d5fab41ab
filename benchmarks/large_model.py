"""Peak memory of an int8 compile of a model over 2 GB, run from another working directory.

The model is generated here in a temporary folder: ``x -> MatMul(W) -> Relu -> MatMul(V)``
with ``W`` a ``--dim`` x ``--dim`` float32 weight (24000: 2.3 GB, past protobuf's 2 GB limit,
so it is saved as ``big.onnx`` + ``big.data``) and a small ``V``. It is compiled to int8 by
``onnxq.compiler.compile_model`` in a fresh subprocess whose working directory is another
folder (the case that failed with ``FileNotFoundError: 'big.data'``). The child samples its
own RSS every 50 ms and remembers the log line that preceded each sample, so the peak is
attributed to a compile phase (``phase_peaks_gb``: the highest phases). The reported peak
is the larger of the child's ``ru_maxrss`` and the sampled peak: ``onnxq.bench`` resets
the kernel's high-water mark (``/proc/self/clear_refs``) to measure each session, which
resets ``ru_maxrss`` too, so after the latency step it only covers the time since.

Usage::

    python benchmarks/large_model.py              # about 3 minutes on 2 cores, ~8 GB RAM
    python benchmarks/large_model.py --no-latency-check   # without the int8-vs-fp32 timing
    python benchmarks/large_model.py --dim 4096   # quick check of the mechanics (64 MB)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, logging, os, sys, threading, time
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig

phase = ["start"]
class Phase(logging.Handler):
    def emit(self, record):
        phase[0] = record.getMessage()[:100]
logging.getLogger("onnxq").addHandler(Phase())
logging.getLogger("onnxq").setLevel(logging.INFO)

samples = []
done = threading.Event()
def sample():
    while not done.is_set():
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        samples.append((rss, phase[0]))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
config = CompileConfig(calibration=sys.argv[3], check_latency=sys.argv[4] == "1")
report = compile_model(sys.argv[1], sys.argv[2], config)
seconds = time.perf_counter() - start
done.set()
peak = max(samples)
phases = {}
for rss, name in samples:
    phases[name] = max(phases.get(name, 0), rss)
top = sorted(phases.items(), key=lambda kv: -kv[1])[:6]
json.dump({"seconds": seconds, "sampled_peak": peak[0], "peak_phase": peak[1],
           "phase_peaks_gb": [[name, round(rss / 1e9, 2)] for name, rss in top],
           "precision": report.precision and report.precision["status"],
           "quantized_nodes": len(report.quantized_nodes or [])}, sys.stdout)
"""


def build(folder: Path, dim: int, opset: int) -> Path:
    """Writes big.onnx + big.data (weights external) and calib.npz into ``folder``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    # Protobuf cannot hold the weight: it goes straight to big.data, row block by row block.
    nbytes = dim * dim * 4
    with open(folder / "big.data", "wb") as f:
        for start in range(0, dim, 1024):
            rows = min(1024, dim - start)
            block = rng.standard_normal((rows, dim), dtype=np.float32)
            block *= np.float32(1 / np.sqrt(dim))
            block.tofile(f)
    w = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[dim, dim])
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.data"), ("offset", "0"), ("length", str(nbytes))):
        w.external_data.add(key=key, value=value)
    v = (rng.standard_normal((dim, 16)) / np.sqrt(dim)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "V"], ["y"], name="mm2"),
        ],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [w, numpy_helper.from_array(v, "V")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = folder / "big.onnx"
    onnx.save(model, str(path))
    np.savez(folder / "calib.npz", x=rng.standard_normal((8, dim), dtype=np.float32))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=24000, help="W is dim x dim float32")
    parser.add_argument("--opset", type=int, default=12, help="12: also the opset upgrade")
    parser.add_argument(
        "--no-latency-check", action="store_true", help="compile with --no-latency-check"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxq-large-") as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()
        (tmp / "elsewhere").mkdir()
        path = build(tmp / "model", args.dim, args.opset)
        weight_bytes = args.dim * args.dim * 4
        start = time.perf_counter()
        child = subprocess.run(
            [
                *(sys.executable, "-c", CHILD, path, "big.int8.onnx", path.parent / "calib.npz"),
                "0" if args.no_latency_check else "1",
            ],
            cwd=tmp / "elsewhere",
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if child.returncode != 0:
            sys.exit(f"compile failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
        result = json.loads(child.stdout)
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        # ru_maxrss misses peaks before the last high-water-mark reset (see the docstring).
        peak = max(maxrss, result["sampled_peak"])
        out = tmp / "elsewhere" / "big.int8.onnx"
        out_bytes = out.stat().st_size + sum(
            p.stat().st_size for p in out.parent.glob("big.int8.onnx.data")
        )
        result.update(
            weight_gb=round(weight_bytes / 1e9, 2),
            opset=args.opset,
            latency_check=not args.no_latency_check,
            peak_rss_gb=round(peak / 1e9, 2),
            ru_maxrss_gb=round(maxrss / 1e9, 2),
            peak_over_weight=round(peak / weight_bytes, 2),
            sampled_peak_gb=round(result.pop("sampled_peak") / 1e9, 2),
            output_gb=round(out_bytes / 1e9, 3),
            wall_s=round(wall, 1),
            seconds=round(result["seconds"], 1),
        )
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
