"""Per-op-type kernel time of a model on ONNX Runtime's CPU provider (its profiler).

Usage: python benchmarks/op_profile.py MODEL.onnx [--runs 30] [--threads 2]

Prints, per op type of the optimised graph ONNX Runtime actually runs, the mean kernel
time per inference, its share and the node count: where the time of an int8 (or fp32)
model goes, e.g. to compare two int8 models of the same net op by op.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def profile(path: str, runs: int, threads: int) -> list[tuple[str, float, int]]:
    """Returns ``(op type, mean ms per run, nodes)`` sorted by time."""
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        rng = np.random.default_rng(0)
        if "int" in i.type:
            feeds[i.name] = rng.integers(0, 8, size=shape).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    for _ in range(runs):
        session.run(None, feeds)
    profile = Path(session.end_profiling())
    try:
        events = json.loads(profile.read_text())
    finally:
        profile.unlink()  # ONNX Runtime writes it into the current folder
    total, nodes = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    return [(op, us / runs / 1000, nodes[op] // runs) for op, us in total.most_common()]


def main() -> None:
    """Parses flags and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = profile(args.model, args.runs, args.threads)
    whole = sum(ms for _, ms, _ in rows)
    for op, ms, count in rows:
        print(f"{op:28s} {ms:8.3f} ms {100 * ms / whole:5.1f}%  nodes={count}")
    print(f"{'total':28s} {whole:8.3f} ms")


if __name__ == "__main__":
    main()
