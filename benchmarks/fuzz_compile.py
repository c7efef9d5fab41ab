"""``onnxq compile`` on many seeded random small graphs (the suite's fuzz test, longer).

Usage: python benchmarks/fuzz_compile.py [--graphs 200] [--seed 0] [--out fuzz-out]

Graph ``i`` is made from seed ``S + i`` (tests/graph_fuzz.py: Conv, ConvTranspose,
BatchNormalization, LayerNormalization, pools, Resize, MatMul (with a weight or of two
activations), Gemm, token-id Gather, Add/Mul/Sub, unary activations, Clip, Transpose,
Concat, Reshape (static, or computed by Shape/Gather/Concat), Flatten, Slice, Split, Pad,
Unsqueeze/Squeeze, Softmax, ReduceMean; opsets 13-19; static batch 1 or 2 or a dynamic
batch; one or two inputs; sometimes an input that is also an output, an unused input, a
constant output, initializers listed as inputs, unnamed nodes, value_info, dynamic H/W)
and compiled in-process twice: int8 from generated calibration data (the latency step on
odd seeds; a drawn --method, --target and --batch-size) and ``--no-quantize``. The checks
are the test's: exit 0, 1 or 2; errors one line and never an internal error (a caught
exception, or a pass failing with a Python exception); written models run on ONNX Runtime
with the input's output names; ``--no-quantize`` equals the input within a relative 1e-4;
int8 outputs finite. Prints the exit codes, the error messages by count, and every
failure with the seed that rebuilds it.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from graph_fuzz import check_compile, invoke_cli, random_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="Keep each case's files here (default: temp).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    codes: collections.Counter = collections.Counter()
    written: collections.Counter = collections.Counter()  # compiles that wrote QDQ
    messages: collections.Counter = collections.Counter()
    failures = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxq-fuzz-") as tmp:
        root = args.out or Path(tmp)
        for seed in range(args.seed, args.seed + args.graphs):
            try:
                case = random_case(seed)
            except Exception as e:  # a generator bug: report it, keep fuzzing
                failures.append(f"seed {seed}: generator: {type(e).__name__}: {e}")
                continue
            for quantize in (True, False):
                folder = root / f"seed{seed}"
                latency = quantize and seed % 2 == 1
                outcome = check_compile(case, folder, invoke_cli, quantize, latency=latency)
                codes[(outcome.mode, outcome.exit_code)] += 1
                written[outcome.mode] += outcome.quantized
                if outcome.message:
                    messages[outcome.message.split(":")[1].strip()[:90]] += 1
                if outcome.problems:
                    failures.append(f"{case.description} [{outcome.mode}]: {outcome.problems}")
    seconds = time.perf_counter() - start
    print(f"{args.graphs} graphs (seeds {args.seed}..{args.seed + args.graphs - 1}), "
          f"{sum(codes.values())} compiles in {seconds:.0f} s")  # fmt: skip
    for (mode, code), count in sorted(codes.items()):
        print(f"  {mode}: exit {code}: {count}")
    print(f"  int8 exit 0 that wrote QDQ (the rest wrote optimised fp32): {written['int8']}")
    for message, count in messages.most_common():
        print(f"  error ({count}x): {message}")
    print(f"failures: {len(failures)}")
    for failure in failures:
        print("  " + failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
