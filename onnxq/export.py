"""Torch to ONNX export: the dynamo exporter first, TorchScript as the fallback."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from torch import nn

from onnxq.errors import CompileError, InputError
from onnxq.io import check_output_path, load_model, save_model, temp_beside

__all__ = [
    "DYNAMO_OPSET",
    "EXPORTERS",
    "MIN_OPSET",
    "TORCHSCRIPT_OPSET",
    "ExportResult",
    "export_torch",
    "load_factory",
    "parse_input_shape",
]

logger = logging.getLogger(__name__)

EXPORTERS = ("auto", "dynamo", "torchscript")
DYNAMO_OPSET = 18
TORCHSCRIPT_OPSET = 17
MIN_OPSET = 17

ModuleFactory = Callable[[], nn.Module]


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What ``export_torch`` wrote and how.

    Attributes:
        path: The ONNX file written.
        exporter: ``"dynamo"`` or ``"torchscript"``: the exporter that produced the file.
        fallback_reason: Why the dynamo exporter was not used, when ``exporter="auto"``
            fell back to TorchScript; ``None`` otherwise.

    """

    path: Path
    exporter: str
    fallback_reason: str | None = None


def load_factory(spec: str) -> ModuleFactory:
    """Resolve a zoo name or ``package.module:callable`` to a model factory.

    Args:
        spec: A zoo model name (``resnet``) or ``package.module:attr`` where ``attr``
            (dotted names allowed) is an ``nn.Module`` class or a function returning one.

    Returns:
        A callable taking no arguments that builds the module and returns it in eval mode.

    Raises:
        InputError: The module or attribute does not exist or is not callable. A factory
            that fails or returns something other than an ``nn.Module`` raises it when called.

    """
    module_name, sep, attr = spec.partition(":")
    if not sep:
        from onnxq.models import EXPORTABLE

        if spec not in EXPORTABLE:
            raise InputError(
                f"unknown model '{spec}': give a zoo name ({', '.join(sorted(EXPORTABLE))}) "
                "or package.module:callable"
            )
        factory: object = EXPORTABLE[spec].factory
    else:
        factory = _import_attr(spec, module_name, attr)
    if not callable(factory):
        raise InputError(f"'{spec}' is a {type(factory).__name__}, not a callable model factory")
    return lambda: _build(spec, factory)


def _import_attr(spec: str, module_name: str, attr: str) -> object:
    if not module_name or not attr:
        raise InputError(f"bad model spec '{spec}': expected package.module:callable")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"cannot import module '{module_name}' for '{spec}': {e}") from e
    for name in attr.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise InputError(f"module '{module_name}' has no attribute '{attr}'") from None
    return obj


def _build(spec: str, factory: Callable[[], object]) -> nn.Module:
    try:
        module = factory()
    except Exception as e:
        # User code: any failure means this spec cannot give a model, so report it as input.
        raise InputError(f"'{spec}' failed to build a model: {type(e).__name__}: {e}") from e
    if not isinstance(module, nn.Module):
        raise InputError(f"'{spec}' returned a {type(module).__name__}, not a torch nn.Module")
    return module.eval()


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` (or ``1x3x224x224``) into a shape tuple.

    Raises:
        InputError: The text is not a list of positive integers.

    """
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InputError(
            f"bad input shape '{text}': expected positive integers separated by commas, "
            "e.g. 1,3,224,224"
        )
    return shape


def export_torch(
    module: nn.Module,
    input_shape: Sequence[int],
    path: str | os.PathLike,
    *,
    input_dtype: torch.dtype = torch.float32,
    dynamic_batch: bool = True,
    optimize: bool = False,
    exporter: str = "auto",
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
    sequence_axis: int | None = None,
) -> ExportResult:
    """Export a Torch module to an ONNX file, atomically.

    A module with several inputs (token ids and an attention mask) takes one input per
    name in ``input_names``, all of ``input_shape`` and ``input_dtype``.

    The exported graph is left unoptimized by default (BatchNormalization and constant
    subgraphs stay) so that onnxq's own passes do the folding and fusion.

    Args:
        module: The module to export; it is put in eval mode.
        input_shape: Shape of the example input, batch first.
        path: Destination ``.onnx`` file; weights go to ``<name>.data`` only when too large
            for one protobuf.
        input_dtype: Element type of the example input (``torch.int64`` for token ids).
        dynamic_batch: Make axis 0 of the input and outputs a symbolic ``batch`` dimension.
        optimize: Let the exporter optimize the graph itself (dynamo: onnxscript's optimizer;
            TorchScript: constant folding, which folds BatchNormalization into Conv).
        exporter: ``"dynamo"``, ``"torchscript"``, or ``"auto"``: dynamo, falling back to
            TorchScript (with a warning) when dynamo fails.
        input_names: Names of the graph inputs (one example input each).
        output_names: Names of the graph outputs.
        sequence_axis: Also make this axis of every input a symbolic ``sequence``
            dimension (token models); None: only the batch axis may be dynamic.

    Returns:
        The path written and the exporter used.

    Raises:
        InputError: Unknown exporter, unusable output path, or an input shape the module
            cannot run on.
        CompileError: The exporter failed (both of them for ``"auto"``).

    """
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter '{exporter}'; choose from {', '.join(EXPORTERS)}")
    path = Path(path)
    check_output_path(None, path)
    module.eval()
    examples = _example_inputs(module, tuple(input_shape), input_dtype, len(input_names))
    names = _GraphNames(tuple(input_names), tuple(output_names), dynamic_batch, sequence_axis)
    with temp_beside(path, folder=True) as tmp:
        # The exporters write weights beside the model: keep those files in a scratch folder.
        raw = Path(tmp) / "model.onnx"
        used, reason = _run_exporter(exporter, module, examples, raw, names, optimize)
        model = _checked_model(raw)
        if dynamic_batch and _batch_is_static(model):
            logger.warning(
                "The batch axis could not be made dynamic; it stays %d", examples[0].shape[0]
            )
        save_model(model, path)
    logger.info("Exported %s with the %s exporter", path, used)
    return ExportResult(path, used, reason)


@dataclasses.dataclass(frozen=True)
class _GraphNames:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_batch: bool
    sequence_axis: int | None = None

    def axes(self) -> dict[int, str]:
        """Axis -> name of the symbolic dimensions of every input."""
        axes = {0: "batch"} if self.dynamic_batch else {}
        if self.sequence_axis is not None:
            axes[self.sequence_axis] = "sequence"
        return axes


def _example_inputs(
    module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, count: int
) -> tuple[torch.Tensor, ...]:
    """Check that the module runs on ``count`` inputs of ``shape``; return the examples."""
    examples = tuple(torch.zeros(shape, dtype=dtype) for _ in range(count))
    try:
        with torch.no_grad():
            module(*examples)
    except Exception as e:
        raise InputError(
            f"the model cannot run on an input of shape {list(shape)} ({dtype}): {_describe(e)}"
        ) from e
    return examples


def _describe(error: Exception) -> str:
    """Return the error's type and the first line of its message (exporter errors run long)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _run_exporter(
    exporter: str,
    module: nn.Module,
    examples: tuple[torch.Tensor, ...],
    dest: Path,
    names: _GraphNames,
    optimize: bool,
) -> tuple[str, str | None]:
    """Run the requested exporter; return the one used and why dynamo was skipped, if so."""
    if exporter == "torchscript":
        _export_torchscript(module, examples, dest, names, optimize)
        return "torchscript", None
    try:
        _export_dynamo(module, examples, dest, names, optimize)
        return "dynamo", None
    except Exception as e:
        reason = _describe(e)
        if exporter == "dynamo":
            raise CompileError(f"the dynamo exporter failed: {reason}") from e
        logger.warning("The dynamo exporter failed (%s); falling back to TorchScript", reason)
    _export_torchscript(module, examples, dest, names, optimize)
    return "torchscript", reason


def _export_dynamo(
    module: nn.Module,
    examples: tuple[torch.Tensor, ...],
    dest: Path,
    names: _GraphNames,
    optimize: bool,
) -> None:
    dynamic_shapes = None
    if names.dynamic_batch:
        # torch.export silently specializes a dimension whose example size is 1, so trace
        # with at least 2 rows; the batch axis stays symbolic either way.
        if examples[0].shape[0] == 1:
            examples = tuple(e.expand(2, *e.shape[1:]).contiguous() for e in examples)
    if names.axes():
        dims = {axis: torch.export.Dim(name, min=1) for axis, name in names.axes().items()}
        dynamic_shapes = tuple(dims for _ in examples)
    with _quiet_torch_logs():
        torch.onnx.export(
            module,
            examples,
            str(dest),
            dynamo=True,
            optimize=optimize,
            opset_version=DYNAMO_OPSET,
            input_names=list(names.inputs),
            output_names=list(names.outputs),
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )


def _export_torchscript(
    module: nn.Module,
    examples: tuple[torch.Tensor, ...],
    dest: Path,
    names: _GraphNames,
    optimize: bool,
) -> None:
    dynamic_axes = None
    if names.axes():
        # Outputs keep only the batch axis: a classifier's logits have no sequence axis.
        dynamic_axes = {name: names.axes() for name in names.inputs}
        if names.dynamic_batch:
            dynamic_axes.update({name: {0: "batch"} for name in names.outputs})
    try:
        with _quiet_torch_logs():
            torch.onnx.export(
                module,
                examples,
                str(dest),
                dynamo=False,
                opset_version=TORCHSCRIPT_OPSET,
                input_names=list(names.inputs),
                output_names=list(names.outputs),
                dynamic_axes=dynamic_axes,
                # Constant folding is what folds BatchNormalization into Conv.
                do_constant_folding=optimize,
            )
    except Exception as e:
        raise CompileError(f"the TorchScript exporter failed: {_describe(e)}") from e


class _DropMessages(logging.Filter):
    """Drops log records whose message contains one of the given fragments."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silence exporter noise that says nothing about the model being exported."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    # Torchvision ops are irrelevant unless the model uses them (then export fails loudly).
    drop = _DropMessages("torchvision is not installed")
    registration.addFilter(drop)
    try:
        with warnings.catch_warnings():
            # Deprecation notices of the TorchScript exporter, which we use on purpose.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # nn.LSTM re-assigns its flat weights while traced; the export is still correct.
            warnings.filterwarnings("ignore", message=".*were assigned during export")
            yield
    finally:
        registration.removeFilter(drop)


def _checked_model(path: Path) -> ir.Model:
    """Validate an exported file with the ONNX checker and load it into the IR."""
    try:
        # The path form also works for models with external data.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise CompileError(f"the exported model is not valid ONNX: {e}") from e
    model = load_model(path)
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise CompileError(f"the exported model has opset {opset}; onnxq needs >= {MIN_OPSET}")
    # The exporter put the weights in a scratch file that is about to be deleted; save_model
    # would keep pointing at it, so read them into memory.
    return ir.external_data.load_to_model(model)


def _batch_is_static(model: ir.Model) -> bool:
    shape = model.graph.inputs[0].shape
    return shape is not None and len(shape) > 0 and isinstance(shape[0], int)
