"""Dynamic int8 (``--mode dynamic``) vs optimised fp32, ORT's quantize_dynamic and static int8.

Usage: python benchmarks/dynamic_mode.py [--threads 1] [--time-budget 8] [--out bench-out]

The zoo's ``bert`` (BERT-mini shape) is exported with dynamic batch and sequence; every
model is fed the same seeded token ids and 0/1 attention masks (seq 128, the tails of half
the rows padded). Models, all from that one fp32 export:

- ``fp32``: onnxq's optimised fp32 (``--no-quantize``), the baseline;
- ``ort_dynamic``: ``onnxruntime.quantization.quantize_dynamic`` on the same optimised
  fp32 model (its defaults: int8 weights per tensor, MatMul and Gather);
- ``ort_dynamic_export``: ``quantize_dynamic`` on the fp32 export itself (what ONNX
  Runtime alone gives; its session fuses the residual Adds into SkipLayerNormalization);
- ``onnxq_dynamic``: ``compile --mode dynamic`` (latency check off, so the int8 model is
  always what is timed; the compile's own check would ship fp32 if int8 were slower);
- ``onnxq_static``: ``compile`` (static QDQ, calibrated on 32 samples, the mixed-precision
  search as by default, latency check off);
- ``onnxq_auto``: ``compile --mode auto`` with the same 32 samples (it times its candidates
  on the first one, batch 1); what it chose per unit is printed.

Latency: one interleaved ``onnxq.bench.benchmark`` run at batch 1 and 8. SQNR: logits of
each model against fp32 on 16 held-out samples, on the deployed path. The zoo ``lstm``
gets fp32 vs ``onnxq_dynamic`` the same way.

Conv: ONNX Runtime's ConvInteger path (``quantize_dynamic(op_types_to_quantize=["Conv"])``
on onnxq's optimised fp32) against fp32 Conv on the zoo ``resnet`` and ``mobilenet`` at
batch 1, interleaved, with its SQNR; and what ``compile --mode dynamic`` decided for Conv
on this machine (its own timing, ``placement.conv`` in the report).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import quantize_dynamic

from onnxq import runtime
from onnxq.bench import benchmark, physical_cores
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.evaluate import sqnr_db
from onnxq.export import export_torch
from onnxq.models import ZOO
from onnxq.numerics import describe_cpu

SEQ = 128


def _tokens(name: str, samples: int, seed: int) -> dict[str, np.ndarray]:
    info = ZOO[name]
    rng = np.random.default_rng(seed)
    length = SEQ if name == "bert" else info.input_shape[1]
    ids = rng.integers(0, 1000, (samples, length))
    if name != "bert":
        return {info.input_names[0]: ids}
    mask = np.ones_like(ids)
    mask[::2, 96:] = 0  # half the rows padded after 96 tokens
    return {"input_ids": ids, "attention_mask": mask}


def _models(name: str, out: Path, static: bool) -> dict[str, Path]:
    info = ZOO[name]
    raw = out / f"{name}.onnx"
    export_torch(
        info.factory(),
        (1, SEQ if name == "bert" else info.input_shape[1]),
        raw,
        input_dtype=info.input_dtype,
        input_names=info.input_names,
        sequence_axis=info.sequence_axis,
    )
    calib = out / f"{name}_calib.npz"
    np.savez(calib, **_tokens(name, 32, seed=1))
    paths = {"fp32": out / f"{name}_fp32.onnx"}
    compile_model(raw, paths["fp32"], CompileConfig(quantize=False))
    if name == "bert":
        paths["ort_dynamic"] = out / f"{name}_ort_dynamic.onnx"
        quantize_dynamic(paths["fp32"], paths["ort_dynamic"])
        paths["ort_dynamic_export"] = out / f"{name}_ort_dynamic_export.onnx"
        quantize_dynamic(raw, paths["ort_dynamic_export"])
    paths["onnxq_dynamic"] = out / f"{name}_onnxq_dynamic.onnx"
    compile_model(raw, paths["onnxq_dynamic"], CompileConfig(mode="dynamic", check_latency=False))
    if static:
        paths["onnxq_static"] = out / f"{name}_onnxq_static.onnx"
        # The default mixed-precision search: all-int8 misses the worst-error floor here.
        config = CompileConfig(calibration=str(calib), check_latency=False)
        report = compile_model(raw, paths["onnxq_static"], config)
        if (report.precision or {}).get("status") == "fp32":  # below the SQNR floor
            logging.getLogger(__name__).error("static int8 wrote fp32: %s", report.precision)
        paths["onnxq_auto"] = out / f"{name}_onnxq_auto.onnx"
        auto = compile_model(
            raw, paths["onnxq_auto"], CompileConfig(mode="auto", calibration=str(calib))
        )
        (out / f"{name}_auto_report.json").write_text(json.dumps(auto.auto, indent=2))
        modes = auto.auto["modes"]
        print(
            f"auto: wrote {auto.auto['emitted']} ({auto.auto['reason']}); units per mode "
            f"{auto.auto['counts']}; per mode: "
            + "; ".join(f"{m} {v['speedup_vs_fp32']} {v['reason'] or ''}" for m, v in modes.items())
        )
    return paths


def conv_rows(out: Path, threads: int, budget: float) -> dict:
    """ONNX Runtime's ConvInteger path (``quantize_dynamic`` on Conv) vs fp32 Conv, batch 1."""
    result = {}
    for name in ("resnet", "mobilenet"):
        info = ZOO[name]
        raw = out / f"{name}.onnx"
        export_torch(info.factory(), info.input_shape, raw, input_dtype=info.input_dtype)
        paths = {
            "fp32": out / f"{name}_fp32.onnx",
            "ort_conv_integer": out / f"{name}_convint.onnx",
        }
        compile_model(raw, paths["fp32"], CompileConfig(quantize=False))
        quantize_dynamic(paths["fp32"], paths["ort_conv_integer"], op_types_to_quantize=["Conv"])
        bench = benchmark([str(p) for p in paths.values()], threads=threads, max_time=budget)
        stats = bench.to_dict()["results"]
        x = {
            info.input_names[0]: np.random.default_rng(4)
            .standard_normal(info.input_shape)
            .astype(np.float32)
        }
        ref = runtime.run(runtime.create_session(paths["fp32"], optimization="all"), x)
        got = runtime.run(runtime.create_session(paths["ort_conv_integer"], optimization="all"), x)
        # What compile --mode dynamic decides for Conv here (its own 2 s timing).
        report = compile_model(
            raw, out / f"{name}_onnxq_dynamic.onnx", CompileConfig(mode="dynamic")
        )
        result[name] = {
            "compile_decision": (report.placement or {}).get("conv"),
            "p50_ms": {r["model"]: r["p50_ms"] for r in stats},
            "speedup": stats[1]["speedup_vs_first"],
            "speedup_ci95": stats[1]["speedup_ci95"],
            "sqnr_db": sqnr_db(next(iter(ref.values())), next(iter(got.values()))),
        }
    return result


def _sqnr(paths: dict[str, Path], feeds: dict[str, np.ndarray]) -> dict[str, float]:
    def logits(path: Path) -> np.ndarray:
        session = runtime.create_session(path, optimization="all")
        return next(iter(runtime.run(session, feeds).values()))

    reference = logits(paths["fp32"])
    return {k: round(sqnr_db(reference, logits(p)), 1) for k, p in paths.items() if k != "fp32"}


def run(name: str, out: Path, threads: int, budget: float, static: bool) -> dict:
    paths = _models(name, out, static)
    data = out / f"{name}_bench.npz"
    np.savez(data, **_tokens(name, 8, seed=2))
    bench = benchmark(
        [str(p) for p in paths.values()],
        batch_sizes=(1, 8),
        threads=threads,
        data=data,
        max_time=budget,
    ).to_dict()
    rows = []
    labels = {str(p): k for k, p in paths.items()}
    for r in bench["results"]:
        rows.append(
            {
                "model": labels[r["model"]],
                "batch": r["batch"],
                "p50_ms": round(r["p50_ms"], 3),
                "speedup_vs_fp32": round(r["speedup_vs_first"], 2),
                "speedup_ci95": [round(x, 2) for x in r["speedup_ci95"]],
                "runs": r["runs"],
            }
        )
    sizes = {k: round(p.stat().st_size / 1e6, 2) for k, p in paths.items()}
    return {
        "model": name,
        "sqnr_db": _sqnr(paths, _tokens(name, 16, seed=3)),
        "size_mb": sizes,
        "latency": rows,
    }


def _table(result: dict) -> str:
    lines = [
        f"### {result['model']}",
        "",
        "| model | batch | p50 ms | speedup vs fp32 [95% CI] | SQNR vs fp32 (dB) | MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["latency"]:
        lo, hi = r["speedup_ci95"]
        sqnr = result["sqnr_db"].get(r["model"], "-")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['p50_ms']:.2f} | {r['speedup_vs_fp32']:.2f}x "
            f"[{lo:.2f}, {hi:.2f}] | {sqnr} | {result['size_mb'][r['model']]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-budget", type=float, default=8.0, help="seconds per batch size")
    parser.add_argument("--out", default="bench-out/dynamic_mode")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [
        run("bert", out, args.threads, args.time_budget, static=True),
        run("lstm", out, args.threads, args.time_budget, static=False),
    ]
    convs = conv_rows(out, args.threads, args.time_budget)
    cpu = {**describe_cpu(), "physical_cores": physical_cores(), "threads": args.threads}
    (out / "results.json").write_text(
        json.dumps({"cpu": cpu, "results": results, "conv": convs}, indent=2)
    )
    print(f"CPU: {cpu['model']} ({', '.join(cpu['isa'])}), threads {args.threads}\n")
    for result in results:
        print(_table(result) + "\n")
    print(
        "| model | fp32 Conv ms | ConvInteger ms | speedup [95% CI] | SQNR (dB) "
        "| compile --mode dynamic |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in convs.items():
        ms = list(r["p50_ms"].values())
        lo, hi = r["speedup_ci95"]
        decided = r["compile_decision"] or {}
        print(
            f"| {name} | {ms[0]:.2f} | {ms[1]:.2f} | {r['speedup']:.2f}x [{lo:.2f}, {hi:.2f}] | "
            f"{r['sqnr_db']:.1f} | {decided.get('decision')}: {decided.get('reason')} |"
        )


if __name__ == "__main__":
    main()
