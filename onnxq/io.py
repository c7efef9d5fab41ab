"""Loading and saving ONNX models: clear errors on bad files, external data, atomic writes."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxq.errors import InputError, OutputWriteError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "atomic_write",
    "check_output_path",
    "check_paths",
    "external_data_files",
    "load_model",
    "model_file_size",
    "model_inputs",
    "model_nbytes",
    "parameter_stats",
    "remove_pending_temps",
    "remove_stale_temps",
    "save_model",
    "temp_beside",
    "temps_beside",
    "unmap_external_data",
]

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message over 2 GiB; stay clearly below that limit.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike, *, announce: bool = True) -> ir.Model:
    """Loads an ONNX model (with its external data) into the IR.

    Repairs what old exporters commonly get wrong and is still unambiguous: duplicate node
    names are made unique, and an IR-3 model's initializers stop being graph inputs.

    Args:
        path: Path to a ``.onnx`` file. External data files are resolved relative to it.
        announce: Log each repair as a warning (False: at debug level, for a second load
            of a file already announced).

    Returns:
        The model as an ``onnx_ir.Model``.

    Raises:
        InputError: The file is missing, unreadable, truncated or not an ONNX model.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise InputError(f"{path}: not a valid ONNX model (truncated or corrupt?): {e}") from e
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph, IR version or opset)")
    _check_single_assignment(proto.graph, path)
    for note in (_repair_node_names(proto.graph), _drop_initializer_inputs(proto)):
        if note:
            logger.log(logging.WARNING if announce else logging.DEBUG, "%s: %s", path, note)
    try:
        model = ir.serde.deserialize_model(proto)
        _resolve_external_data(model, path.parent.resolve())
        if model_nbytes(model) <= EXTERNAL_DATA_THRESHOLD:
            # Serialized as is, external tensors keep their relative file names, which
            # break an output saved in another folder and ORT sessions created from bytes.
            ir.external_data.load_to_model(model)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the model's external data: {e}") from e
    logger.debug("Loaded %s: %d nodes", path, len(model.graph))
    return model


def _graphs(graph: onnx.GraphProto):
    """Yields ``graph`` and its subgraphs (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _check_single_assignment(graph: onnx.GraphProto, path: Path) -> None:
    """Refuses a graph in which one value name is produced twice (it has no meaning).

    Raises:
        InputError: Naming the value and what produces it twice.
    """
    for g in _graphs(graph):
        # An IR-3 model lists its initializers as inputs too: one definition, not two.
        producers = {name: "a graph input" for name in (*(i.name for i in g.input),)}
        producers.update({t.name: "an initializer" for t in g.initializer})
        for node in g.node:
            here = f"{node.op_type} node '{node.name}'" if node.name else f"a {node.op_type} node"
            for name in node.output:
                if not name:  # an omitted optional output
                    continue
                if name in producers:
                    raise InputError(
                        f"{path}: invalid model: value '{name}' is produced twice "
                        f"(by {producers[name]} and by {here}); each value must have one producer"
                    )
                producers[name] = here


def _repair_node_names(graph: onnx.GraphProto) -> str | None:
    """Renames duplicate node names (old exporters emit them; ONNX Runtime refuses them).

    Returns:
        What was repaired, or None.
    """
    seen: set[str] = set()
    renamed = 0
    nodes = [n for g in _graphs(graph) for n in g.node]
    taken = {n.name for n in nodes}
    for node in nodes:
        if node.name and node.name in seen:
            base, k = node.name, 1
            while f"{base}_{k}" in taken:
                k += 1
            node.name = f"{base}_{k}"
            taken.add(node.name)
            renamed += 1
        seen.add(node.name)
    return (
        f"renamed {renamed} duplicate node name(s) (ONNX Runtime needs unique names)"
        if renamed
        else None
    )


# IR version 4 made initializers constants rather than defaults of graph inputs; 7 is
# what opset 13, the lowest onnxq quantizes at, ships with.
_NORMALISED_IR_VERSION = 7


def _drop_initializer_inputs(proto: onnx.ModelProto) -> str | None:
    """Normalises IR-3 models: their initializers are also listed as graph inputs.

    Left as inputs, weights are not constants: BatchNormalization is not folded and an
    int8 model's new scales would make ``onnx.checker`` fail (IR 3 wants every initializer
    listed as an input). Later IR versions read initializers as constants.
    """
    if proto.ir_version >= 4:
        return
    weights = {t.name for t in proto.graph.initializer}
    kept = [i for i in proto.graph.input if i.name not in weights]
    dropped = len(proto.graph.input) - len(kept)
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    note = (
        f"IR version {proto.ir_version} model: {dropped} initializer(s) listed as graph inputs "
        f"are read as constants (IR version raised to {_NORMALISED_IR_VERSION})"
    )
    proto.ir_version = _NORMALISED_IR_VERSION
    return note


def _resolve_external_data(model: ir.Model, base_dir: Path) -> None:
    """Points external tensors at ``base_dir`` and checks that their files exist."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                tensor.base_dir = base_dir
                if not (base_dir / tensor.location).is_file():
                    raise OSError(f"external data file '{tensor.location}' not found")


def unmap_external_data(*models: ir.Model) -> int:
    """Closes the memory maps of the models' external tensors; returns the bytes unmapped.

    onnx_ir maps an external tensor's file when the tensor is first read and keeps the map,
    whose pages count in the process's resident memory for as long as it lives (a 2.3 GB
    weight read once stays 2.3 GB of RSS). A tensor maps its file again when next read, so
    this costs only a re-read, usually from the page cache.
    """
    unmapped = 0
    for model in models:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor) and tensor.raw is not None:
                    try:
                        tensor.release()
                    except BufferError:  # an array of it is still in use: the map stays
                        continue
                    unmapped += tensor.nbytes
    return unmapped


def parameter_stats(model: ir.Model) -> tuple[int, int]:
    """Returns the number of elements and bytes of all initializers, subgraphs included."""
    count = size = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                count += value.const_value.size
                size += value.const_value.nbytes
    return count, size


def model_nbytes(model: ir.Model) -> int:
    """Returns the total size in bytes of all initializers of the model."""
    return parameter_stats(model)[1]


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files a model file names, beside it; none when it cannot be read.

    Only the protobuf is parsed (``load_external_data=False``): the data is not read.
    """
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError):
        return []  # load_model says what is wrong with it
    locations = dict.fromkeys(
        entry.value
        for tensor in _proto_tensors(proto.graph)
        for entry in tensor.external_data
        if entry.key == "location"
    )
    return [path.parent / location for location in locations]


def model_file_size(path: str | os.PathLike) -> int:
    """Size of a model file plus the external data files beside it that it names."""
    path = Path(path)
    return path.stat().st_size + sum(p.stat().st_size for p in external_data_files(path))


def _proto_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and constant attributes of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _proto_tensors(attr.g)
            for sub in attr.graphs:
                yield from _proto_tensors(sub)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: after symlinks and ``..``, or as hard links."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_paths(
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
    outputs: Iterable[tuple[str, str | os.PathLike | None]],
) -> None:
    """Refuses, before any work, outputs that would overwrite an input or each other.

    Every command that writes files calls this with all it reads and all it writes, so that
    nothing the user gave is overwritten and no output silently replaces another.

    Args:
        inputs: ``(what, path)`` of every file read, e.g. ``("input model", "m.onnx")``
            (see `model_inputs` for a model and its external data); ``None`` paths are skipped.
        outputs: ``(flag, path)`` of every file written, e.g. ``("--report", "r.json")``;
            the flag may be empty.

    Raises:
        InputError: An output is an input, two outputs are one file, an output is a
            folder, or its folder is missing or not writable.
    """
    sources = [(what, Path(p)) for what, p in inputs if p is not None]
    written: list[tuple[str, Path]] = []
    for flag, p in outputs:
        if p is None:
            continue
        dst = Path(p)
        name = f"{flag} {dst}" if flag else str(dst)
        for what, src in sources:
            if _same_file(dst, src):
                raise InputError(
                    f"{name}: output path is the {what}; choose another output path "
                    "(onnxq never overwrites its inputs)"
                )
        for other_flag, other in written:
            if _same_file(dst, other):
                other_name = f"{other_flag} {other}" if other_flag else str(other)
                raise InputError(
                    f"{name} and {other_name} are the same file; give each output its own path"
                )
        folder = dst.parent
        if not folder.is_dir():
            raise InputError(f"{name}: output folder '{folder}' does not exist")
        if dst.is_dir():
            raise InputError(f"{name}: output path is a folder; give a file name")
        try:
            # Creating a file there is the one test that holds for root, ACLs and
            # read-only mounts alike (os.access says yes to root).
            with temp_beside(dst):
                pass
        except OutputWriteError as e:
            reason = getattr(e.__cause__, "strerror", None) or "not writable"
            raise InputError(
                f"{name}: cannot write in the output folder '{folder}': {reason}"
            ) from None
        written.append((flag, dst))


def model_inputs(
    path: str | os.PathLike | None, what: str = "input model"
) -> list[tuple[str, Path]]:
    """``(what, path)`` of a model file and of each external-data file it names."""
    if path is None:
        return []
    path = Path(path)
    return [(what, path)] + [
        (f"external data file of the {what} ({path})", data) for data in external_data_files(path)
    ]


def check_output_path(input_path: str | os.PathLike | None, output_path: str | os.PathLike) -> None:
    """Refuses output paths that would overwrite the input model (or its external data).

    ``input_path`` is ``None`` when the output is not derived from an input file (export).

    Raises:
        InputError: See `check_paths`.
    """
    check_paths(model_inputs(input_path), [("", output_path)])


# Hidden files (and export's scratch folders) the writers keep beside their outputs until
# the rename: `remove_pending_temps` deletes them when a signal ends the run.
_PENDING: set[Path] = set()
# What follows ".<output name>." in their names: the writer's process id, so a later run
# can tell leftovers of a killed process (SIGKILL cannot be caught) from a live run's files.
# The staging file's own temporary file (written by save_model) is named after it, so
# a name may nest: ".<name>.<pid>.<hex>.staging.onnx" + ".<pid>.<hex>.tmp", with one more dot.
_TEMP_NAME = re.compile(r"(?P<pid>\d+)\.[0-9a-f]{8}\.(tmp|staging\.onnx)(\.\d+\.[0-9a-f]{8}\.tmp)?")
# Names of earlier versions, which had no process id: "staging.onnx", mkstemp's "<8>.tmp".
_OLD_TEMP_NAME = re.compile(r"staging\.onnx|[a-z0-9_]{8}\.tmp")


@contextlib.contextmanager
def temp_beside(
    path: str | os.PathLike, suffix: str = ".tmp", *, folder: bool = False
) -> Iterator[Path]:
    """A new hidden file (or folder) beside ``path``, for writing before a rename over it.

    It is removed on exit unless it was renamed away; a signal that ends the run midway is
    covered by `remove_pending_temps`, and leftovers of killed runs by `remove_stale_temps`,
    which runs first.

    Args:
        path: The output the temporary file stands in for.
        suffix: ``.tmp`` or ``.staging.onnx``.
        folder: Make a folder (export's scratch space) instead of a file.

    Raises:
        InputError: The file cannot be created there; the message names ``path``.
    """
    path = Path(path)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
    # Registered before it exists: an interrupt anywhere after this line leaves no orphan.
    _PENDING.add(tmp)
    try:
        try:
            if folder:
                tmp.mkdir()
            else:
                # 0o666 less the umask: the permissions a plain open() would give.
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as e:
            raise OutputWriteError(f"{path}: cannot write there: {e.strerror or e}") from e
        yield tmp
    finally:
        _remove(tmp)
        _PENDING.discard(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_pending_temps() -> None:
    """Deletes every temporary file the writers still hold (called when a signal ends a run)."""
    for tmp in list(_PENDING):
        _remove(tmp)
        _PENDING.discard(tmp)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files earlier runs, since killed, left beside ``path``.

    Files of a process that is still running are kept: it may be writing them now.

    Returns:
        The paths removed.
    """
    removed = []
    for leftover, pid in _temps_beside(Path(path)):
        if pid is None or not _alive(pid):
            _remove(leftover)
            removed.append(leftover)
    if removed:
        logger.info("Removed %d file(s) an interrupted run left: %s", len(removed), removed)
    return removed


def temps_beside(path: str | os.PathLike) -> list[Path]:
    """The temporary files (and folders) onnxq's writers keep beside ``path`` right now."""
    return [tmp for tmp, _ in _temps_beside(Path(path))]


def _temps_beside(path: Path) -> list[tuple[Path, int | None]]:
    """Each temporary file named after ``path``, with its writer's process id (None: unknown)."""
    found: list[tuple[Path, int | None]] = []
    with contextlib.suppress(OSError):
        for leftover in path.parent.glob(f".*{glob.escape(path.name)}.*"):
            prefix = f".{path.name}." if leftover.name[1] != "." else f"..{path.name}."
            if not leftover.name.startswith(prefix):
                continue
            rest = leftover.name[len(prefix) :]
            match = _TEMP_NAME.fullmatch(rest)
            if match is not None:
                found.append((leftover, int(match["pid"])))
            elif _OLD_TEMP_NAME.fullmatch(rest):  # else: not a name onnxq writes
                found.append((leftover, None))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: alive
    return True


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Opens a temporary file beside ``path`` and renames it over ``path`` on success.

    A crash or error midway leaves any existing file at ``path`` untouched.

    Raises:
        InputError: The file cannot be written there (the message names ``path``).
    """
    path = Path(path)
    with temp_beside(path) as tmp:
        try:
            with open(tmp, mode) as f:
                yield f
            os.replace(tmp, path)
        except OSError as e:
            raise OutputWriteError(f"{path}: cannot write: {e.strerror or e}") from None


def save_model(
    model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None
) -> Path:
    """Saves a model atomically, with external data when it is too large for one protobuf.

    Args:
        model: The model to save; it is not modified.
        path: Destination ``.onnx`` file.
        external_data: Force (True) or forbid (False) an external ``<name>.data`` file;
            by default it is used only when the weights approach protobuf's 2 GB limit.

    Returns:
        The path written.
    """
    path = Path(path)
    if external_data is None:
        external_data = model_nbytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        # Tensors still backed by another model's .data file must be read in, or the
        # output would point at a file that may not exist beside it.
        model = ir.external_data.load_to_model(model)
    with temp_beside(path) as tmp:
        try:
            if external_data:
                # ir.save writes the data file itself atomically; the name is relative to
                # the model.
                ir.save(model, tmp, format="protobuf", external_data=f"{path.name}.data")
            else:
                ir.save(model, tmp, format="protobuf")
            os.replace(tmp, path)
        except OSError as e:
            raise OutputWriteError(f"{path}: cannot write: {e.strerror or e}") from None
    logger.info("Saved %s", path)
    return path
