"""``onnxq compile``: an fp32 ONNX model in, an optimised (by default int8) model out."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import click

from onnxq import io
from onnxq.cli import options
from onnxq.cli._progress import terminal_progress
from onnxq.cli._reports import write_reports
from onnxq.cli.bench import parse_shape_overrides
from onnxq.compiler import CompileReport, compile_model
from onnxq.config import CALIBRATION_METHODS, MODES, TARGETS, CompileConfig
from onnxq.errors import FidelityError, InputError
from onnxq.executor import Executor, make_executor
from onnxq.fidelity import load_metric
from onnxq.pipeline import NEEDS_DATA
from onnxq.plugins import load_plugins, resolve_pass
from onnxq.prune_search import SearchResult, is_auto, search_sparsity
from onnxq.prune_spec import PruneSpec

__all__ = ["compile_command"]

_DEFAULT = CompileConfig()

# [tool.onnxq] keys of earlier versions, named after the settings rather than the flags.
RENAMED_KEYS = {
    "calibration": "calibration-data",
    "calibration-method": "method",
    "verify-samples": "check-samples",
    "check-latency": "latency-check",
}

_METHOD_HELP = (
    "Calibration range method: minmax (observed min and max), percentile (clip the tails at "
    "--percentile), entropy (threshold of least KL divergence, as TensorRT), mse (range of "
    "least expected quantization error)."
)
_TARGET_HELP = (
    "Deployment target, which decides the int8 numerics: auto (detect this machine), avx2 and "
    "avx512 (no VNNI: 7-bit GEMM weights, so 16-bit accumulation cannot saturate), vnni "
    "(AVX-512/AVX VNNI or AMX: full 8-bit weights), arm, cuda (symmetric int8 activations)."
)
_PRUNE_HELP = (
    "Prune first: channels:0.3[:l2][:compensate][:exact|:round=N] (remove output channels, "
    "kept counts rounded to this CPU's ONNX Runtime channel block unless exact; compensate: "
    "biases absorb removed channels' means, needs data), unstructured:0.5[:global] (zero weights), "
    "2:4 (two of every four weights), or mask:FILE.npz: an .npz mapping initializer names to "
    "0/1 arrays of the initializer's shape (1 keeps a weight), e.g. saved from "
    "torch.nn.utils.prune. channels:auto searches the sparsity (--max-accuracy-drop)."
)


def _split(values: tuple[str, ...]) -> tuple[str, ...] | None:
    """Flattens repeated and comma-separated option values; None when not given."""
    items = tuple(v.strip() for value in values for v in value.split(",") if v.strip())
    return items or None


@click.command("compile")
@options.model_path()
@click.option("-o", "--output", required=True, help="Output .onnx path (must differ from MODEL).")
@options.weight_only(_DEFAULT, MODES)
@click.option("--dynamic", is_flag=True, hidden=True, help="Renamed: --mode dynamic.")
@click.option(
    "--quantize/--no-quantize",
    default=_DEFAULT.quantize,
    help="Quantize to int8; --no-quantize optimises in fp32 only.",
)
@click.option(
    "--calibration-data",
    "calibration",
    metavar="SOURCE",
    help="Calibration data: an .npz keyed by input names, a folder of them (or of .npy "
    "files, or of images: see the image options), or pkg.module:fn.",
)
@click.option(
    "--method",
    "calibration_method",
    type=click.Choice(CALIBRATION_METHODS),
    default=_DEFAULT.calibration_method,
    help=_METHOD_HELP,
)
@click.option(
    "--percentile",
    type=float,
    default=_DEFAULT.percentile,
    help="Percentile kept by --method percentile.",
)
@click.option(
    "--max-samples",
    type=int,
    help="Use at most this many calibration samples.",
    show_default="all",
)
@options.batch_size(
    default=_DEFAULT.batch_size,
    help="Calibration batch size (at most: --max-memory may lower it).",
    type=int,
)
@click.option(
    "--max-memory",
    metavar="SIZE",
    help="Memory calibration may use, e.g. 4GB; it sets the batch size and how many passes "
    "over the data observe which tensors.",
    show_default="half the available RAM, at most 16GB",
)
@click.option(
    "--ranges", metavar="FILE.json", help="Load activation ranges instead of calibrating."
)
@click.option(
    "--save-ranges", metavar="FILE.json", help="Save the calibrated ranges for later --ranges."
)
@click.option("--target", type=click.Choice(TARGETS), default=_DEFAULT.target, help=_TARGET_HELP)
@click.option("--exclude", multiple=True, help="Node name or regex kept fp32 (repeat or a,b).")
@click.option(
    "--op-types",
    multiple=True,
    help="Quantize only these op types (a,b). A name that is no ONNX operator is an error; "
    "an op type this model lacks, a warning.",
)
@click.option("--prune", metavar="SPEC", help=_PRUNE_HELP)
@click.option("--prune-exclude", multiple=True, help="Node, regex or op type never pruned (a,b).")
@options.max_accuracy_drop(
    "With --prune KIND:auto: largest top-1 drop (percentage points) the search accepts."
)
@click.option(
    "--eval-data",
    type=click.Path(dir_okay=False, path_type=str),
    metavar="FILE.npz",
    help="With --prune KIND:auto: data the search measures top-1 on (needs --labels).",
)
@options.labels("Key of the labels in --eval-data.")
@options.min_sqnr(
    default=_DEFAULT.min_sqnr,
    help="Fidelity floor: SQNR (dB) of every output, and of each part of a packed output, "
    "against fp32.",
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1, min_open=True),
    default=_DEFAULT.min_agreement,
    help="Fidelity floor: top-1 agreement of class-score outputs (and exact match of "
    "integer outputs) with fp32.",
)
@click.option(
    "--metric",
    metavar="PKG.MODULE:FN",
    help="Your fidelity metric, which the int8 model must satisfy: fn(fp32, candidate), each "
    "{output name: [array per run]}, returns a bool or (bool, score).",
)
@click.option(
    "--tune-budget",
    type=click.FloatRange(min=0),
    default=_DEFAULT.tune_budget,
    metavar="SECONDS",
    help="Time the mixed-precision search may take keeping layers fp32 when all-int8 misses "
    "the fidelity floors (0: no search). A safety net: --tune-trials bounds the search "
    "reproducibly; the report says when the clock stopped it instead.",
)
@click.option(
    "--tune-trials",
    type=click.IntRange(min=0),
    default=_DEFAULT.tune_trials,
    metavar="N",
    help="End-to-end checks the mixed-precision search may make (all-int8 included): the "
    "bound that makes the same model and data give the same placement.",
)
@click.option(
    "--require-int8",
    is_flag=True,
    default=_DEFAULT.require_int8,
    help="Exit 1 instead of writing the optimised fp32 model when no int8 placement meets "
    "the fidelity floors.",
)
@options.image_preprocessing
@options.provider(default=_DEFAULT.provider)
@options.executor
@click.option(
    "--check-samples",
    "verify_samples",
    type=int,
    default=_DEFAULT.verify_samples,
    help="Samples the deployed int8 model is checked on against fp32 (0: skip).",
)
@click.option(
    "--latency-check/--no-latency-check",
    "check_latency",
    default=_DEFAULT.check_latency,
    help="Place int8 for latency: units ONNX Runtime does not fuse stay fp32, int8 is timed "
    "against onnxq's optimised fp32 at batch 1, which is written if int8 is not faster "
    "(--no-latency-check: QDQ as inserted, untimed).",
)
@click.option("--verify", is_flag=True, help="Check outputs after every pass.")
@click.option(
    "--tolerance",
    type=float,
    default=_DEFAULT.tolerance,
    help="--verify tolerance for exact passes (relative).",
)
@click.option(
    "--pass",
    "user_passes",
    multiple=True,
    help="Extra pass: pkg.module:Class, or a registered pass's name (repeat).",
)
@options.plugins()
@click.option("--report", type=click.Path(dir_okay=False), help="Write the compile report as JSON.")
@options.report_options("markdown", "html")
@options.config(("tool", "onnxq"), RENAMED_KEYS)
def compile_command(
    model: str,
    output: str,
    dynamic: bool,
    shapes: tuple[str, ...],
    user_passes: tuple[str, ...],
    plugins: tuple[str, ...],
    report: str | None,
    reports: dict[str, str | None],
    max_accuracy_drop: float | None,
    eval_data: str | None,
    labels_key: str | None,
    executor: str,
    workers: int | None,
    ray_address: str | None,
    **settings,
) -> None:
    """Compile MODEL (fp32 ONNX) into an optimised, by default int8, ONNX model."""
    if dynamic:
        # The old placeholder flag: one spelling of the mode, so it names the new one.
        raise InputError(
            "--dynamic was renamed: use --mode dynamic (dynamic int8 needs no calibration "
            "data; static int8 needs calibration data)"
        )
    settings["exclude"] = _split(settings["exclude"])
    settings["op_types"] = _split(settings["op_types"])
    settings["prune_exclude"] = _split(settings["prune_exclude"])
    # Defaults already hold [tool.onnxq] (see options.config): no second read of the file.
    config = CompileConfig.from_sources(settings, pyproject=None)
    code = [("--plugin module", p) for p in plugins]
    code += [("--pass module", spec) for spec in user_passes]
    _check_files(model, output, config, report, reports, eval_data, code)
    if config.quantize and config.metric:
        try:
            load_metric(config.metric)
        except InputError as e:
            raise InputError(f"bad --metric: {e}") from None
    load_plugins(plugins)
    extra = [resolve_pass(spec) for spec in user_passes]
    # Ray starts on first use only: a compile that submits no task starts nothing.
    with make_executor(executor, workers, ray_address) as runner, _in_flag_terms():
        search = _search_prune(model, config, max_accuracy_drop, eval_data, labels_key, runner)
        if search is not None:
            # The final compile (int8 included) prunes at the sparsity found, or not at all.
            config = dataclasses.replace(config, prune=search.spec)
        with terminal_progress("calibrating", "samples") as bar:
            result = compile_model(
                model,
                output,
                config,
                extra_passes=extra,
                progress=_progress,
                calibration_progress=bar.update if bar else None,
                shapes=parse_shape_overrides(shapes),
                executor=runner,
            )
    if search is not None:
        result.prune_search = search.to_dict()
        click.echo(_search_line(search))
    write_reports(result.to_dict(), {"json": report, **reports})
    _echo_summary(output, result)


def _check_files(
    model: str,
    output: str,
    config: CompileConfig,
    report: str | None,
    reports: dict[str, str | None],
    eval_data: str | None,
    code: Sequence[tuple[str, str]] = (),
) -> None:
    """Refuses outputs that are an input or each other, before any work.

    ``code`` is ``(what, pkg.module[:name])`` of the user's modules (plugins, passes):
    their source files are inputs, like the metric's and a data function's module.
    """
    prune = PruneSpec.parse(config.prune) if config.prune and not is_auto(config.prune) else None
    modules = [*code, ("--metric module", config.metric)]
    if isinstance(config.calibration, str):
        modules.append(("--calibration-data module", config.calibration))
    options.check_files(
        [
            *io.model_inputs(model),
            *((what, options.module_file(spec)) for what, spec in modules),
            ("--calibration-data", config.calibration),
            ("--ranges file", config.ranges),
            ("--prune mask file", prune.masks if prune is not None else None),
            ("--eval-data file", eval_data),
        ],
        {
            "-o": output,
            "--save-ranges": config.save_ranges,
            "--report": report,
            **options.report_flags(reports),
        },
    )


@contextlib.contextmanager
def _in_flag_terms() -> Iterator[None]:
    """Re-says the engine's errors about settings with the flags that change them."""
    try:
        yield
    except FidelityError as e:
        # The compile raises it only when int8 is required (no fp32 fallback).
        raise FidelityError(f"{e} (--require-int8 refuses the fp32 fallback)") from None
    except InputError as e:
        if str(e) != NEEDS_DATA:
            raise
        raise InputError(
            "static int8 needs calibration data: pass --calibration-data with a .npz keyed by "
            "the model's input names (axis 0 = samples), a folder of .npy/.npz files or "
            "images, or pkg.module:fn; or --ranges from an earlier --save-ranges; or "
            "--no-quantize for fp32"
        ) from None


def _search_prune(
    model: str,
    config: CompileConfig,
    max_drop: float | None,
    eval_data: str | None,
    labels_key: str | None,
    executor: Executor,
) -> SearchResult | None:
    """Runs the sparsity search when ``--prune`` asks for ``auto``; checks its flags first."""
    if not is_auto(config.prune):
        if max_drop is not None or eval_data or labels_key:
            raise InputError(
                "--max-accuracy-drop, --eval-data and --labels only apply to "
                "--prune KIND:auto (e.g. channels:auto)"
            )
        return None
    if max_drop is None:
        raise InputError(f"--prune {config.prune} needs --max-accuracy-drop POINTS (top-1 budget)")
    if not eval_data:
        raise InputError(f"--prune {config.prune} needs --eval-data FILE.npz to measure top-1 on")
    if not labels_key:
        raise InputError("--eval-data needs --labels KEY: the search compares top-1 accuracy")
    return search_sparsity(
        model, config.prune, eval_data, labels_key, max_drop, config, executor=executor
    )


def _search_line(search: SearchResult) -> str:
    tried = ", ".join(f"{s:g}: {100 * top1:.1f}%" for s, top1 in search.tried)
    if search.spec is None:
        return (
            f"prune search: no tried sparsity keeps the drop <= {search.max_drop_points:g} "
            f"points, not pruned (top-1 {100 * search.accuracy_fp32:.1f}%; tried {tried})"
        )
    return (
        f"prune search: {search.spec} (top-1 {100 * search.accuracy_pruned:.1f}% vs "
        f"{100 * search.accuracy_fp32:.1f}%, drop {search.drop_points:.1f} <= "
        f"{search.max_drop_points:g} points; tried {tried})"
    )


def _progress(line: str) -> None:
    click.echo(f"mixed precision: {line}", err=True)


def _precision_line(precision: dict) -> str | None:
    """One line for a mixed or fp32 decision (None when all-int8 passed)."""
    if precision["status"] == "fp32":
        return f"warning: wrote the optimised fp32 model, not int8: {precision['reason']}"
    if precision["status"] != "mixed":
        return None
    islands = precision["fp32_islands"]
    shown = ", ".join(f"{i['unit']} ({_gain(i)})" for i in islands[:5])
    more = f", +{len(islands) - 5} more" if len(islands) > 5 else ""
    return (
        f"mixed precision: {len(islands)} of {precision['units']} int8 ranges kept fp32 "
        f"({precision['seconds']:.1f} s): {shown}{more}"
    )


def _gain(island: dict) -> str:
    gain = island["gain_sqnr_db"]
    return "gain not measured" if gain is None else f"+{gain:.1f} dB kept fp32"


def _echo_summary(output: str, result: CompileReport) -> None:
    click.echo(
        f"wrote {output}: {result.nodes_before} -> {result.nodes_after} nodes, "
        f"{result.size_before / 1e6:.2f} -> {result.size_after / 1e6:.2f} MB"
    )
    fusion = result.fusion.get("note")
    if fusion:
        click.echo(f"batchnorm: {fusion}")
    for name, details in (result.pruning or {}).items():
        if details.get("note"):
            click.echo(f"prune ({name}): {details['note']}")
    if result.weight_only is not None:
        click.echo(_weight_only_line(result.weight_only))
    if result.auto is not None:
        for line in _auto_lines(result.auto):
            click.echo(line)
    placement = result.placement or {}
    fp32_written = (result.precision or {}).get("status") == "fp32"
    if placement.get("emitted") == "fp32":
        click.echo(f"int8: not written, the optimised fp32 model was: {placement['reason']}")
    elif result.numerics is not None and not fp32_written and not result.quantized_nodes:
        click.echo(_nothing_quantized_line(result.not_quantized or {}))
    elif result.numerics is not None and not fp32_written:
        numerics = result.numerics
        reverted = len(placement.get("reverted", {}))
        click.echo(
            f"int8{' (dynamic)' if result.config.get('mode') == 'dynamic' else ''}: "
            f"{len(result.quantized_nodes or [])} nodes quantized, "
            f"{len(result.not_quantized or {})} kept fp32"
            + (f" ({reverted} because int8 did not pay)" if reverted else "")
            + f"; target {numerics['target']} ({numerics['reason']}), "
            f"weights {numerics['weight_range']}"
        )
    line = _precision_line(result.precision) if result.precision else None
    if line is not None:
        click.echo(line, err=line.startswith("warning"))
    fidelity = result.fidelity or {}
    if fidelity.get("checked") is False:
        click.echo(f"fidelity vs fp32: NOT CHECKED ({fidelity['reason']})")
    elif fidelity:
        which = "all-int8 (not written)" if fp32_written else "fidelity"
        if placement.get("emitted") == "fp32":
            which = "int8 (not written: not faster)"
        vs_input = fidelity.get("vs_input_min_sqnr_db")
        click.echo(
            f"{which} vs {fidelity.get('reference', 'fp32')} on {fidelity['samples']} samples: "
            f"min SQNR {fidelity['min_sqnr_db']:.1f} dB (floor {fidelity['floor_db']:g})"
            + ("" if vs_input is None else f"; vs the unpruned input: {vs_input:.1f} dB")
        )
    if result.latency is not None:
        click.echo(_latency_line(result.latency))


def _nothing_quantized_line(not_quantized: dict[str, str]) -> str:
    """Says that no node is int8 (the optimised fp32 model was written) and why, counted."""
    reasons = collections.Counter(why.split(";")[0] for why in not_quantized.values())
    counted = "; ".join(f"{n} {why}" for why, n in reasons.most_common())
    return "int8: nothing quantized, the optimised fp32 model was written" + (
        f" ({len(not_quantized)} nodes kept fp32: {counted})" if counted else ""
    )


def _weight_only_line(section: dict) -> str:
    """What weight-only quantization did: nodes, bytes, and which model was written."""
    sizes = section["weight_bytes"]
    ratio = f" ({sizes['ratio']:.1f}x smaller)" if sizes["ratio"] else ""
    written = (
        f"wrote int{section['bits']} weight-only"
        if section["emitted"] == "weight-only"
        else "wrote the optimised fp32 model"
    )
    aware = section.get("activation_aware")
    measured = ""
    if aware is not None:  # given data: scales and bits from the measured error
        scaled = sum(1 for choice in aware.values() if choice["alpha"] > 0)
        gptq = sum(1 for choice in aware.values() if choice["method"] == "gptq")
        kept = (section.get("end_to_end") or {}).get("chosen", "aware")
        check = "" if kept == "aware" else f"; end to end, {kept} packing kept"
        measured = (
            f" (from the data: {gptq} rounded by GPTQ, {scaled} scaled activation-aware, "
            f"{len(section['fallback'])} in 8 bits by error{check})"
        )
    return (
        f"weight-only int{section['bits']} block {section['block_size']}: "
        f"{len(section['quantized_nodes'])} MatMul/Gemm quantized{measured}, "
        f"{len(section['not_quantized'])} kept fp32; MatMul weights "
        f"{sizes['before'] / 1e6:.2f} -> {sizes['after'] / 1e6:.2f} MB{ratio}; "
        f"{written}: {section['reason']}"
    )


def _auto_lines(section: dict) -> list[str]:
    """What --mode auto chose: per mode, the units and the measurements; what was written."""
    lines = []
    for mode, info in section["modes"].items():
        taken = section["counts"].get(mode, 0)
        if info["used"] and taken:
            what = f"used for {taken} unit(s)"
        elif info["used"]:
            what = "faithful and faster than fp32, but no unit ended in it (see the units)"
        else:
            what = f"not used: {info['reason']}"
        speed = info["speedup_vs_fp32"]
        timed = f" ({speed:.2f}x optimised fp32)" if speed is not None and info["used"] else ""
        lines.append(f"auto: {mode}{timed}: {what}")
    kept = section["counts"].get("fp32", 0)
    lines.append(
        f"auto: wrote {section['emitted']}: {section['reason']}"
        + (f"; {kept} unit(s) kept fp32 (reasons in --report)" if kept else "")
    )
    fidelity = section.get("fidelity") or {}
    if fidelity.get("checked") is False:
        lines.append(f"fidelity vs fp32: NOT CHECKED ({fidelity['reason']})")
    elif "min_sqnr_db" in fidelity:
        lines.append(f"fidelity vs fp32: min SQNR {fidelity['min_sqnr_db']:.1f} dB")
    return lines


def _latency_line(latency: dict) -> str:
    """Batch-1 medians and int8's speedup over the input and over optimised fp32."""

    def speedup(key: str) -> str:
        lo, hi = latency[f"{key}_ci95"]
        return f"{latency[key]:.2f}x [{lo:.2f}, {hi:.2f}]"

    written = "int8" if latency["emitted"] == "int8" else "optimised fp32 (int8 not faster)"
    # Large models: the input was timed in a second pair with int8, not beside fp32.
    pairs = latency.get("timing", {}).get("mode") == "pairs"
    return (
        f"latency batch 1: input {latency['input_p50_ms']:.3f} ms, optimised fp32 "
        f"{latency['fp32_p50_ms']:.3f} ms, int8 {latency['int8_p50_ms']:.3f} ms; int8 "
        f"{speedup('speedup')} vs input, {speedup('speedup_vs_fp32')} vs optimised fp32; "
        f"wrote {written}" + ("; timed in two pairs to bound memory" if pairs else "")
    )
