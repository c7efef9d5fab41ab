"""onnxq weight-only int4 vs ONNX Runtime's MatMulNBits quantizers on the zoo decoder.

Usage: python benchmarks/weight_only.py [--train-steps 2000] [--blocks 32,128] [--threads 1]
       [--time-budget 6] [--out bench-out/weight_only]

The zoo ``decoder`` (4 blocks, d_model 256, vocab 8192, tied LM head) is trained on local
text (bytes of the Python standard library's top-level modules, as token ids 0-255;
``--train-steps 0`` keeps the seeded random weights), exported, and quantized to 4 bits at
each block size by:

* onnxq ``--mode weight-only`` (``compile_model``; the latency check off, so the
  weight-only model is what is measured), without data (round-to-nearest) and with
  ``--calibration-data`` (activation-aware scales and bits by measured error, ``--min-sqnr``
  20 dB per layer);
* ONNX Runtime's ``MatMulNBitsQuantizer``, on onnxq's optimised fp32 (on the export it
  quantizes nothing: the dynamo export reads each weight through a Transpose), with
  ``DefaultWeightOnlyQuantConfig`` (its native round-to-nearest), ``RTNWeightOnlyQuantConfig``
  and ``GPTQWeightOnlyQuantConfig`` (the Intel Neural Compressor algorithms ONNX Runtime
  1.32 ships a copy of in ``onnxruntime.quantization.neural_compressor``: no extra
  package) and ``HQQWeightOnlyQuantConfig``, all at the same bits and block size. GPTQ and
  onnxq's data rows use the same calibration sequences (training text, not held out).

Reported per model: file size, the bytes of the weights MatMuls read and the shrink
against the export's (its MatMul weights and the tied embedding, once), next-token top-1
agreement with fp32 and perplexity on held-out text, and latency of a single-token step
(``input`` 1x1: no KV cache, a whole-model forward of one token) and of a 128-token
prompt, all models timed interleaved in one ``onnxq.bench.benchmark`` run per shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import sysconfig
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization import matmul_nbits_quantizer as nbits

from onnxq.bench import benchmark
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.export import export_torch
from onnxq.models import LANGUAGE_MODELS

SEQ = 64


def _text_tokens() -> np.ndarray:
    """Bytes of the Python standard library's top-level modules, as token ids 0-255.

    Local text that does not move with onnxq's sources (it is fixed for a Python version),
    so the held-out comparison is the same text from one commit to the next.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    return np.frombuffer(b"\n".join(p.read_bytes() for p in files), dtype=np.uint8).astype(np.int64)


def _train(model: torch.nn.Module, tokens: np.ndarray, steps: int) -> None:
    """A few AdamW steps of next-token prediction on random windows of ``tokens``."""
    if steps <= 0:
        return
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(steps):
        starts = rng.integers(0, len(tokens) - SEQ - 1, size=8)
        batch = torch.from_numpy(np.stack([tokens[s : s + SEQ + 1] for s in starts]))
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            logging.info("train step %d: loss %.3f", step, loss.item())
    model.eval()


def _heldout(tokens: np.ndarray, steps: int, count: int = 256) -> np.ndarray:
    """Held-out sequences: the last tenth of the text (never trained on) or random ids."""
    if steps <= 0:
        return np.random.default_rng(1).integers(0, 8192, size=(count, SEQ + 1))
    tail = tokens[int(0.9 * len(tokens)) :]
    starts = np.linspace(0, len(tail) - SEQ - 2, count).astype(int)
    return np.stack([tail[s : s + SEQ + 1] for s in starts])


def _second_text(steps: int, count: int = 256) -> np.ndarray:
    """A second held-out text: the standard library's email, json, logging, urllib, http
    and xml packages (training reads the top-level modules only), or random ids."""
    if steps <= 0:
        return np.random.default_rng(4).integers(0, 8192, size=(count, SEQ + 1))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    packages = ("email", "json", "logging", "urllib", "http", "xml")
    files = sorted(f for name in packages for f in (stdlib / name).rglob("*.py"))
    text = np.frombuffer(b"\n".join(f.read_bytes() for f in files), dtype=np.uint8)
    starts = np.linspace(0, len(text) - SEQ - 2, count).astype(int)
    return np.stack([text[s : s + SEQ + 1] for s in starts]).astype(np.int64)


def _calibration(tokens: np.ndarray, steps: int, count: int = 16) -> np.ndarray:
    """Calibration sequences from the training text (seeded), or random ids untrained."""
    rng = np.random.default_rng(2)
    if steps <= 0:
        return rng.integers(0, 8192, size=(count, SEQ))
    train = tokens[: int(0.9 * len(tokens))]
    starts = rng.integers(0, len(train) - SEQ, size=count)
    return np.stack([train[s : s + SEQ] for s in starts])


# Per model and text, agreeing tokens per held-out sequence (for the paired intervals).
agree: dict[tuple[Path, str], np.ndarray] = {}


def _paired_interval(a: np.ndarray, b: np.ndarray, resamples: int = 2000) -> tuple[int, int]:
    """95% bootstrap interval of ``sum(a - b)`` over sequences (agreeing tokens).

    The tokens of one sequence share their context, so the sequences are resampled, not
    the tokens: agreement flips come in runs where a text repeats a near-tie.
    """
    diff = (a - b).astype(np.int64)
    rng = np.random.default_rng(3)
    sums = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].sum(axis=1)
    return int(np.percentile(sums, 2.5)), int(np.percentile(sums, 97.5))


def _weight_bytes(path: Path) -> int:
    """Bytes of the initializers MatMul-like nodes read (each counted once).

    A tied head's embedding counts (the head reads it through a Transpose); the position
    embedding, read by a Gather only, does not.
    """
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    produced = {o: n for n in model.graph.node for o in n.output}
    readers = {"MatMul", "Gemm", "MatMulNBits", "GatherBlockQuantized"}
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in readers:
            continue
        for name in node.input:
            # Through a Transpose or Reshape of an initializer (a tied head, a shared pack).
            source = produced.get(name)
            if source is not None and source.op_type in ("Transpose", "Reshape"):
                name = source.input[0]
            if name in inits:
                seen.add(name)
    return sum(onnx.numpy_helper.to_array(inits[n]).nbytes for n in seen)


def _predict(path: Path, seqs: np.ndarray, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 next tokens and the held-out tokens' log-probabilities (in chunks: 8k logits)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    top1, logp = [], []
    for i in range(0, len(seqs), chunk):
        part = seqs[i : i + chunk]
        logits = session.run(None, {"input": part[:, :-1]})[0]
        norm = np.logaddexp.reduce(logits, axis=-1)
        top1.append(logits.argmax(-1))
        logp.append(np.take_along_axis(logits, part[:, 1:, None], axis=-1)[..., 0] - norm)
    return np.concatenate(top1), np.concatenate(logp)


def _quality(path: Path, fp32_top1: np.ndarray, seqs: np.ndarray, text: str) -> dict:
    top1, logp = _predict(path, seqs)
    agree[path, text] = (top1 == fp32_top1).sum(axis=1)
    return {
        "top1_agreement": float((top1 == fp32_top1).mean()),
        "agree_tokens": int((top1 == fp32_top1).sum()),
        "perplexity": float(np.exp(-logp.mean())),
    }


class _Reader(CalibrationDataReader):
    """GPTQ's calibration data: one sequence per run."""

    def __init__(self, seqs: np.ndarray) -> None:
        self._feeds = iter([{"input": s[None]} for s in seqs])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def _ort(src: Path, dest: Path, config, block: int) -> Path:
    # bits and block_size here are RTN's and GPTQ's group (the others carry their own).
    quantizer = nbits.MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=4, block_size=block, is_symmetric=False, algo_config=config
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(dest), use_external_data_format=False)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--blocks", default="32,128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-budget", type=float, default=6.0)
    parser.add_argument("--out", default="bench-out/weight_only")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse OUT/export.onnx (trained) of an earlier run"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxq", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokens = _text_tokens()
    export = out / "export.onnx"
    if not (args.reuse and export.exists()):
        module = LANGUAGE_MODELS["decoder"].factory()
        started = time.perf_counter()
        _train(module, tokens[: int(0.9 * len(tokens))], args.train_steps)
        logging.info("trained %d steps in %.0f s", args.train_steps, time.perf_counter() - started)
        export_torch(module, (1, 16), export, input_dtype=torch.int64, sequence_axis=1)
    fp32 = out / "fp32.onnx"
    compile_model(export, fp32, CompileConfig(quantize=False))
    calib = _calibration(tokens, args.train_steps)
    calib_path = str(out / "calib.npz")
    np.savez(calib_path, input=calib)
    models: dict[str, Path] = {"fp32 (onnxq optimised)": fp32}
    compile_s: dict[str, float] = {}
    notes: dict[str, str] = {}
    for block in (int(b) for b in args.blocks.split(",")):
        head: tuple[str, ...] = ()
        # Every weight in 4 bits (the tied head/embedding too), then the head kept fp32 as
        # ORT's quantizers leave it (they skip MatMul(x, Transpose(E))): same weights.
        # Above block 32, also the tied head and its lookups in blocks of 32 (--tied-block-size).
        variants = [(False, None, None), (False, calib_path, None)]
        variants += [(False, calib_path, 32)] if block > 32 else []
        variants += [(True, None, None), (True, calib_path, None)]
        for keep, data, tied_block in variants:
            t = time.perf_counter()
            label = f"onnxq int4 b{block}" + (" head fp32" if keep else "")
            label += f" tied b{tied_block}" if tied_block else ""
            label += " + data (GPTQ/AWQ)" if data else ""
            path = out / (
                f"onnxq_b{block}{'_head' if keep else ''}{f'_t{tied_block}' if tied_block else ''}"
                f"{'_data' if data else ''}.onnx"
            )
            config = CompileConfig(
                mode="weight-only",
                bits=4,
                block_size=block,
                tied_block_size=tied_block,
                check_latency=False,
                calibration=data,
                exclude=head if keep else (),
            )
            report = compile_model(export, path, config)
            if not head:
                users = [n for names in report.weight_only["tied"].values() for n in names]
                quantized = report.weight_only["quantized_nodes"]
                head = tuple(n for n in quantized if any(u.startswith(f"{n}_Q") for u in users))
            models[label], compile_s[label] = path, time.perf_counter() - t
            wo = report.weight_only
            notes[label] = f"tied: {sorted(wo['tied'])}"
            if data:
                chosen = [
                    a["method"] if a["method"] == "gptq" else f"awq {a['alpha']}"
                    for a in wo["activation_aware"].values()
                ]
                notes[label] += (
                    f"; per layer {chosen}; int8 fallbacks {wo['fallback']}; fp32 "
                    f"{[n for n, why in wo['not_quantized'].items() if 'SQNR' in why]}; "
                    f"end to end {wo.get('end_to_end')}"
                )
        ort_configs = {
            f"ORT default int4 b{block}": nbits.DefaultWeightOnlyQuantConfig(
                block_size=block, is_symmetric=False, bits=4
            ),
            f"ORT RTN int4 b{block}": nbits.RTNWeightOnlyQuantConfig(),
            f"ORT GPTQ int4 b{block}": nbits.GPTQWeightOnlyQuantConfig(
                calibration_data_reader=_Reader(calib)
            ),
            f"ORT HQQ int4 b{block}": nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=4),
        }
        for name, config in ort_configs.items():
            t = time.perf_counter()
            try:
                slug = name.split()[1]
                models[name] = _ort(fp32, out / f"ort_{slug}_b{block}.onnx", config, block)
                compile_s[name] = time.perf_counter() - t
            except Exception as e:  # a quantizer that fails is a result, said in the notes
                notes[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    texts = {"heldout": _heldout(tokens, args.train_steps), "text2": _second_text(args.train_steps)}
    fp32_top1 = {text: _predict(fp32, seqs)[0] for text, seqs in texts.items()}
    rows = {}
    base_bytes = _weight_bytes(export)
    for name, path in models.items():
        wb = _weight_bytes(path)
        rows[name] = {
            "file_mb": path.stat().st_size / 1e6,
            "weight_mb": wb / 1e6,
            "shrink": base_bytes / wb,
            **{text: _quality(path, fp32_top1[text], s, text) for text, s in texts.items()},
            "compile_s": compile_s.get(name),
        }
    for shape in ((1, 1), (1, 128)):
        result = benchmark(
            [str(p) for p in models.values()],
            threads=args.threads,
            shapes={"input": shape},
            max_time=args.time_budget,
        )
        p50 = [float(np.median(stats.samples_ms)) for stats in result.stats]
        for name, ms in zip(models, p50, strict=True):
            rows[name][f"p50_ms_{shape[1]}"] = ms
            rows[name][f"speedup_{shape[1]}"] = p50[0] / ms
    # Each onnxq model against the most faithful ORT configuration at its block size.
    for name, path in models.items():
        block = name.split(" b")[1].split()[0] if " b" in name else None
        ort_rows = [n for n in models if n.startswith("ORT ") and n.endswith(f" b{block}")]
        if not name.startswith("onnxq") or not ort_rows:
            continue
        for text in texts:
            best = max(ort_rows, key=lambda n, t=text: rows[n][t]["agree_tokens"])
            low, high = _paired_interval(agree[path, text], agree[models[best], text])
            rows[name][text]["vs_best_ort"] = {
                "config": best,
                "tokens": rows[name][text]["agree_tokens"] - rows[best][text]["agree_tokens"],
                "ci95": [low, high],
            }
    (out / "results.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=2))
    print(
        "| model | file MB | weights MB | shrink | top-1 agr. (tokens) | vs best ORT, 95% CI "
        "| text 2: agr. | text 2: vs best ORT | ppl | 1-token ms (x fp32) "
        "| 128-token ms (x fp32) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        cells = []
        for text in texts:
            vs = r[text].get("vs_best_ort")
            versus = f"{vs['tokens']:+d} [{vs['ci95'][0]:+d}, {vs['ci95'][1]:+d}]" if vs else ""
            q = r[text]
            cells += [f"{100 * q['top1_agreement']:.2f}% ({q['agree_tokens']})", versus]
        print(
            f"| {name} | {r['file_mb']:.2f} | {r['weight_mb']:.2f} | {r['shrink']:.1f}x | "
            f"{' | '.join(cells)} | {r['heldout']['perplexity']:.3f} | "
            f"{r['p50_ms_1']:.3f} ({r['speedup_1']:.2f}x) | "
            f"{r['p50_ms_128']:.2f} ({r['speedup_128']:.2f}x) |"
        )
    for name, note in notes.items():
        print(f"- {name}: {note}")


if __name__ == "__main__":
    main()
