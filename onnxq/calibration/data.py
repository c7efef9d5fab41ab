"""Calibration data sources (npz, npy/npz folders, images, callables), streamed in batches."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import logging
import os
import re
import struct
import zipfile
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx_ir as ir

from onnxq.errors import InputError
from onnxq.inputs import (
    InputSpec,
    SampleLayout,
    check_names,
    conform,
    input_specs,
    sample_layouts,
)

__all__ = [
    "ABSURD_MAGNITUDE",
    "IMAGE_SUFFIXES",
    "Batch",
    "CalibrationData",
    "ImagePreprocess",
    "batch_samples",
    "can_batch",
    "is_callable_spec",
    "open_calibration_data",
    "split_batches",
]

logger = logging.getLogger(__name__)

# Float inputs beyond this magnitude are almost surely unscaled or garbage (images are in
# [0, 255] or normalised, audio in [-1, 1], features standardised).
ABSURD_MAGNITUDE = 1e6

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_CALLABLE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

# A chunk: stacks of samples keyed by input name (axis 0 = samples, then each sample's shape
# as the model takes it), and where they came from (for messages).
_Chunk = tuple[dict[str, np.ndarray], str]


FROM_MODEL = "model"
COVER = "cover"


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """How images become model inputs; every step is explicit, nothing is guessed.

    Steps, in order: decode as RGB, resize (bilinear) so the short side is ``resize`` (or,
    with ``resize="cover"``, by the least factor that makes the image cover the crop,
    keeping its aspect), center-crop to ``crop``, convert to float32 and multiply by
    ``scale``, subtract ``mean`` and divide by ``std`` per channel (RGB order), reorder
    channels to ``channel_order``, and lay out as ``layout`` (a batch axis is added in
    front). ``"model"`` settings are read from the image input's shape by `for_input`.

    Attributes:
        resize: Target length of the short side, ``"cover"``, or None to keep the size.
        crop: Center crop size ``(height, width)`` or one int for a square; ``"model"``
            for the input's static H and W (no crop when they are dynamic); or None.
        mean: Per-channel mean (RGB order, after scaling), or None.
        std: Per-channel standard deviation (RGB order, after scaling), or None.
        layout: ``NCHW``, ``NHWC``, or None to take it from the input's shape (the axis
            of size 3).
        channel_order: ``RGB`` or ``BGR``.
        scale: Factor the pixel values (0-255) are multiplied by; True is 1/255 (values
            in [0, 1]), False or None keeps them. Without scale, mean and std the images
            stay uint8.
    """

    resize: int | str | None = None
    crop: int | tuple[int, int] | str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    layout: str | None = None
    channel_order: str = "RGB"
    scale: float | bool | None = True

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC", None):
            raise InputError(f"image layout must be NCHW or NHWC, got '{self.layout}'")
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(f"image channel order must be RGB or BGR, got '{self.channel_order}'")
        if isinstance(self.resize, str) and self.resize != COVER:
            raise InputError(f"image resize must be a size or '{COVER}', got '{self.resize}'")
        if isinstance(self.resize, int) and self.resize <= 0:
            raise InputError(f"image resize must be a positive size, got {self.resize}")
        if self.crop not in (None, FROM_MODEL) and min(self.crop_size) <= 0:
            raise InputError(f"image crop must be positive, got {self.crop}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise InputError(f"image {name} needs 3 values (R, G, B), got {value}")
        if self.std is not None and any(s == 0 for s in self.std):
            raise InputError(f"image std must not contain 0, got {self.std}")
        if not isinstance(self.scale, (bool, int, float, type(None))) or self.scale == 0:
            raise InputError(f"image scale must be a nonzero number, got {self.scale!r}")

    @property
    def crop_size(self) -> tuple[int, int]:
        """The crop as ``(height, width)``."""
        assert self.crop is not None and self.crop != FROM_MODEL
        return (self.crop, self.crop) if isinstance(self.crop, int) else tuple(self.crop)

    @property
    def factor(self) -> float | None:
        """What pixel values are multiplied by, or None."""
        if self.scale is True:
            return 1 / 255
        return None if self.scale is False or self.scale is None else float(self.scale)

    def for_input(self, spec: InputSpec) -> ImagePreprocess:
        """Returns these settings with the ``"model"`` and unset ones read from ``spec``.

        Raises:
            InputError: The input is not a 4-D 3-channel image input, or its layout is
                ambiguous and not given.
        """
        shape = spec.shape
        dims = "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
        if len(shape) != 4:
            raise InputError(
                f"images need a 4-D input (NCHW or NHWC); input '{spec.name}' has shape {dims}"
            )
        layout = self.layout
        if layout is None:
            nchw, nhwc = shape[1] == 3, shape[3] == 3
            if not (nchw or nhwc) and all(isinstance(shape[i], int) for i in (1, 3)):
                raise InputError(
                    f"images are RGB (3 channels) but input '{spec.name}' {dims} has no "
                    "axis of 3 channels (axis 1 for NCHW, 3 for NHWC)"
                )
            if nchw == nhwc:
                raise InputError(
                    f"cannot tell the image layout of input '{spec.name}' {dims}: "
                    "give the layout (--layout NCHW or NHWC)"
                )
            layout = "NCHW" if nchw else "NHWC"
        channels, height, width = shape[1:] if layout == "NCHW" else (shape[3], *shape[1:3])
        if isinstance(channels, int) and channels != 3:
            raise InputError(
                f"images are RGB (3 channels) but input '{spec.name}' {dims} takes "
                f"{channels} channels as {layout}"
            )
        crop = self.crop
        static = isinstance(height, int) and isinstance(width, int)
        if crop == FROM_MODEL:
            crop = (height, width) if static else None
        elif crop is not None and static and self.crop_size != (height, width):
            size = "x".join(map(str, self.crop_size))
            raise InputError(
                f"image size {size} (height x width) does not fit input '{spec.name}' {dims} "
                f"({layout}: {height}x{width})"
            )
        return dataclasses.replace(self, layout=layout, crop=crop)

    def apply(self, path: Path) -> np.ndarray:
        """Loads one image file and returns it preprocessed, with a batch axis of 1.

        Raises:
            InputError: The file cannot be decoded as an image.
        """
        from PIL import Image

        with _reading_image(path):
            with Image.open(path) as img:
                img = img.convert("RGB")
        size = self._resized(*img.size)
        if size != img.size:
            img = img.resize(size, Image.BILINEAR)
        if self.crop is not None:
            img = _center_crop(img, self.crop_size, path)
        return self._to_array(np.asarray(img))

    def output_size(self, path: Path | None = None) -> tuple[int, int]:
        """The ``(height, width)`` `apply` makes: the crop's, else read from the file's header.

        Only the header is read (no pixels are decoded), so a shard of sharded calibration
        can tell where its batches start without decoding the images before them.

        Raises:
            InputError: No crop, and the file's header cannot be read.
        """
        if self.crop is not None:
            return self.crop_size
        from PIL import Image

        assert path is not None
        with _reading_image(path):
            with Image.open(path) as img:  # lazy: reads the header only
                width, height = self._resized(*img.size)
        return height, width

    def _resized(self, w: int, h: int) -> tuple[int, int]:
        """The ``(width, height)`` an image of ``w`` x ``h`` is resized to."""
        factor = None
        if isinstance(self.resize, int):
            factor = self.resize / min(w, h)
        elif self.resize == COVER and self.crop not in (None, FROM_MODEL):
            height, width = self.crop_size
            factor = max(height / h, width / w)
        if factor is None or factor == 1:
            return w, h
        # Covering, one side becomes the crop's and the other rounds to at least its own.
        return max(1, round(w * factor)), max(1, round(h * factor))

    @property
    def dtype(self) -> np.dtype:
        """What `apply` makes: float32 when pixels are scaled or normalised, else uint8."""
        floating = self.factor is not None or self.mean is not None or self.std is not None
        return np.dtype(np.float32 if floating else np.uint8)

    def _to_array(self, pixels: np.ndarray) -> np.ndarray:
        array = pixels
        factor = self.factor
        if array.dtype != self.dtype:
            array = array.astype(self.dtype)
        if factor is not None:
            array *= np.float32(factor)
        if self.mean is not None:
            array -= np.asarray(self.mean, dtype=np.float32)
        if self.std is not None:
            array /= np.asarray(self.std, dtype=np.float32)
        if self.channel_order == "BGR":
            array = array[..., ::-1]
        if self.layout != "NHWC":
            array = array.transpose(2, 0, 1)
        return np.ascontiguousarray(array)[None]


@contextlib.contextmanager
def _reading_image(path: Path) -> Iterator[None]:
    """Turns Pillow's errors for a broken file into one `InputError` naming it."""
    from PIL import Image

    try:
        yield
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Pillow reports broken files as OSError (unidentified, truncated) or SyntaxError.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: cannot read image: {reason}") from None


def _center_crop(img: Any, size: tuple[int, int], path: Path) -> Any:
    height, width = size
    w, h = img.size
    if w < width or h < height:
        raise InputError(f"{path}: image is {w}x{h}, smaller than the {width}x{height} crop")
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


# ---------------------------------------------------------------------------------------------
# Reading .npy streams (plain files or npz members) a few rows at a time.


@dataclasses.dataclass
class _ArrayFile:
    """An ``.npy`` array in a file or an npz member, read row block by row block.

    Plain reads into a fresh array are used rather than a memory map: mapped pages that have
    been read stay in the process's resident set, so peak memory would grow with the file.
    """

    path: Path
    member: str | None
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def label(self) -> str:
        return f"{self.path}[{self.member}]" if self.member else str(self.path)

    @classmethod
    def open_header(cls, path: Path, member: str | None = None) -> _ArrayFile:
        """Reads only the header (shape and dtype) of the array."""
        try:
            with _open_stream(path, member) as f:
                shape, fortran, dtype = _read_header(f)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            where = f"{path}[{member}]" if member else str(path)
            raise InputError(f"{where}: not a readable .npy array: {e}") from e
        if dtype.hasobject:
            raise InputError(f"{path}: array holds Python objects, not numbers")
        return cls(path, member, shape, dtype, fortran)

    def blocks(self, rows: int | None, start: int = 0) -> Iterator[np.ndarray]:
        """Yields consecutive blocks of at most ``rows`` rows (axis 0), or the whole array.

        ``start`` rows are skipped first (with ``rows`` only): without reading them, except
        that a Fortran-ordered array is read whole, and a compressed npz member
        decompresses what it skips (a deflate stream has no offsets to seek to).
        """
        if rows is None:
            with _open_stream(self.path, self.member) as f:
                yield np.lib.format.read_array(f)
            return
        if self.fortran_order:
            # Rows of a Fortran-ordered array are not contiguous; the whole array must be read.
            logger.debug("%s is Fortran-ordered: reading it whole", self.label)
            with _open_stream(self.path, self.member) as f:
                array = np.lib.format.read_array(f)
            for first in range(start, max(len(array), 1), rows):
                yield array[first : first + rows]
            return
        row_shape = self.shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        with _open_stream(self.path, self.member) as f:
            _read_header(f)
            if start:
                f.seek(start * row_bytes, os.SEEK_CUR)
            for first in range(start, self.shape[0], rows):
                n = min(rows, self.shape[0] - first)
                block = np.empty((n, *row_shape), dtype=self.dtype)
                if row_bytes and f.readinto(memoryview(block).cast("B")) != n * row_bytes:
                    raise InputError(f"{self.label}: file is truncated")
                yield block


def _open_stream(path: Path, member: str | None) -> BinaryIO:
    if member is None:
        return open(path, "rb")
    archive = zipfile.ZipFile(path)
    info = archive.getinfo(member + ".npy")
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
        # An uncompressed member (np.savez's) is a plain byte range of the file: opened
        # as the file, it seeks (a zip member stream reads all it skips), so a shard of
        # sharded calibration starts at its first row without reading the rows before.
        f = open(path, "rb")
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] == b"PK\x03\x04":
            name, extra = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name + extra)
            archive.close()
            return f
        f.close()
    # The archive stays open as long as the member stream (ZipFile keeps a reference).
    return archive.open(member + ".npy")


def _read_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _npz_members(path: Path) -> list[_ArrayFile]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a valid .npz file (a zip of .npy arrays): {e}") from e
    return [_ArrayFile.open_header(path, name) for name in names]


# ---------------------------------------------------------------------------------------------
# Validation against the model's inputs.


@dataclasses.dataclass(frozen=True)
class _Keys:
    """What keys besides the model inputs the data may hold.

    Attributes:
        labels: Key of integer class labels read alongside the inputs, or None.
        ignore_extra: Other keys are ignored (a data set's columns) rather than an error.
    """

    labels: str | None = None
    ignore_extra: bool = False


# A file's arrays and how each holds samples.
_Group = tuple[dict[str, _ArrayFile], dict[str, SampleLayout]]


def _to_samples(
    columns: list[InputSpec], item: Mapping[str, Any], where: str, keys: _Keys
) -> dict[str, np.ndarray]:
    """Checks one in-memory item against the inputs and returns it as stacks of samples."""
    check_names(
        [c for c in columns if c.name != keys.labels],
        (n for n in item if n != keys.labels),
        where,
        ignore_extra=keys.ignore_extra,
    )
    arrays = {c.name: np.asarray(item[c.name]) for c in columns}
    for name, array in arrays.items():
        if array.dtype.hasobject:
            raise InputError(f"{where}: '{name}' holds Python objects, not numbers")
    layouts = sample_layouts(columns, {n: (a.shape, a.dtype) for n, a in arrays.items()}, where)
    return {name: layouts[name].samples(array) for name, array in arrays.items()}


# ---------------------------------------------------------------------------------------------
# Sources: each yields chunks of any size; CalibrationData cuts them into batches.


@dataclasses.dataclass
class _Held:
    """Samples a source keeps in memory: its first ``samples``, as the chunks first read.

    Attributes:
        chunks: The chunks, as read (stacks of samples along axis 0).
        samples: The samples they hold: the source's first ones.
        complete: Whether they are all the source's samples.
        nbytes: Their size.
    """

    chunks: list[_Chunk]
    samples: int
    complete: bool
    nbytes: int

    def replay(self, start: int) -> Iterator[_Chunk]:
        """The held chunks from sample ``start``, as fresh arrays the reader may keep."""
        for arrays, where in self.chunks:
            count = _chunk_samples(arrays)
            if start >= count:
                start -= count
                continue
            yield {n: a[start:].copy() for n, a in arrays.items()}, where
            start = 0


class _Source:
    """Where samples come from: knows its sample count (if it can) and yields chunks.

    With `hold`, the samples of the first read from the start stay in memory when they fit:
    later reads (calibration's other passes, the checks after compiling, other passes that
    read the data) come from memory instead of decoding the files or calling the function
    again.
    """

    kind = "source"

    def __init__(self, label: str, num_samples: int | None) -> None:
        self.label = label
        self.num_samples = num_samples
        self._hold_cap = 0
        self._held: _Held | None = None
        self._estimate: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A worker (sharded calibration) reads its own shard from the files: held samples
        # are not shipped to it, nor does it hold any.
        state = dict(self.__dict__)
        state.update(_hold_cap=0, _held=None, _estimate=None)
        return state

    def estimated_bytes(self) -> int | None:
        """The bytes all samples take as read, when known without reading them."""
        return None

    def hold(self, max_bytes: int, samples: int | None = None) -> None:
        """Keeps the samples read from the start in memory, up to ``max_bytes`` in all.

        Data estimated larger (its first ``samples``, the ones its reader uses) is never
        held; a read whose chunks pass ``max_bytes`` drops what was kept. Either way the
        source stays streamed.
        """
        estimate = self.estimated_bytes()
        if estimate is not None and samples is not None and self.num_samples:
            estimate = -(-estimate * min(samples, self.num_samples) // self.num_samples)
        self._estimate = estimate
        self._hold_cap = 0 if estimate is not None and estimate > max_bytes else max_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes held in memory, or that reading on from the start may come to hold."""
        if self._held is not None and (self._held.complete or not self._hold_cap):
            return self._held.nbytes
        if not self._hold_cap:
            return 0
        return self._estimate if self._estimate is not None else self._hold_cap

    def read(self, rows: int, start: int = 0) -> Iterator[_Chunk]:
        """`chunks`, from memory as far as the source holds them; holds what it reads on."""
        held = self._held or _Held([], 0, False, 0)
        yield from held.replay(start)
        if held.complete:
            return
        # Held only where `chunks` can start at a sample (or nothing is held).
        start = max(start, held.samples)
        if start > held.samples or not self._hold_cap:
            yield from self.chunks(rows, start)
            return
        kept: list[_Chunk] | None = list(held.chunks)
        size, samples = held.nbytes, held.samples
        try:
            for arrays, where in self.chunks(rows, start):
                if kept is not None:
                    size += sum(a.nbytes for a in arrays.values())
                    if size > self._hold_cap:  # too large to hold: stays streamed
                        kept, self._held, self._hold_cap = None, None, 0
                    else:
                        kept.append((arrays, where))
                        samples += _chunk_samples(arrays)
                        arrays = {n: a.copy() for n, a in arrays.items()}  # the reader's own
                yield arrays, where
        except GeneratorExit:
            # The reader stopped early (its sample limit, `take`): what it read is still
            # the data's start, and a later read goes on after it where the source can
            # start at a sample (a callable cannot: it is held only when read whole).
            if kept is not None and self.sample_runs() is not None:
                self._held = _Held(kept, samples, False, size)
            raise
        if kept is not None:
            self._held = _Held(kept, samples, True, size)

    def chunks(self, rows: int, start: int = 0) -> Iterator[_Chunk]:  # pragma: no cover
        """Chunks of samples; from sample ``start`` when `sample_runs` can tell (else 0)."""
        raise NotImplementedError

    def sample_runs(self) -> Iterator[tuple[int, Hashable]] | None:
        """The samples in order, as runs of ``(count, shape key)``, told without decoding.

        Samples share a batch only when their shapes are equal, so these runs say where
        each batch starts (see `_batch_starts`); equal keys mean equal sample shapes.
        None: the source cannot tell before reading its samples.
        """
        return None


class _ArraySource(_Source):
    """A sequence of ``.npy`` arrays or npz files read in lockstep per file."""

    kind = "arrays"

    def __init__(self, label: str, groups: list[_Group]) -> None:
        super().__init__(label, sum(next(iter(lay.values())).count for _, lay in groups))
        self.groups = groups

    def estimated_bytes(self) -> int:
        return sum(
            int(np.prod(f.shape, dtype=np.int64)) * f.dtype.itemsize
            for files, _ in self.groups
            for f in files.values()
        )

    def sample_runs(self) -> Iterator[tuple[int, Hashable]]:
        # The headers, read when the source was opened, give each file's count and shapes.
        for files, layouts in self.groups:
            count = next(iter(layouts.values())).count
            yield count, tuple((n, layouts[n].sample_shape(f.shape)) for n, f in files.items())

    def chunks(self, rows: int, start: int = 0) -> Iterator[_Chunk]:
        for files, layouts in self.groups:
            count = next(iter(layouts.values())).count
            if start >= count:  # a file wholly before ``start``: not even opened
                start -= count
                continue
            where = next(iter(files.values())).path.name
            # Within a file, sample ``start`` is a fixed row offset (see `_ArrayFile.blocks`).
            readers = {
                name: f.blocks(layouts[name].rows(rows), layouts[name].rows(start) or 0)
                for name, f in files.items()
            }
            start = 0
            for blocks in zip(*readers.values(), strict=True):
                arrays = dict(zip(readers, blocks, strict=True))
                yield {n: layouts[n].samples(a) for n, a in arrays.items()}, where


class _ImageSource(_Source):
    kind = "images"

    def __init__(
        self, label: str, files: list[Path], spec: InputSpec, preprocess: ImagePreprocess
    ) -> None:
        super().__init__(label, len(files))
        self.files, self.spec, self.preprocess = files, spec, preprocess

    def estimated_bytes(self) -> int | None:
        if self.preprocess.crop is None:  # each image's size is its own
            return None
        height, width = self.preprocess.crop_size
        return len(self.files) * height * width * 3 * self.preprocess.dtype.itemsize

    def sample_runs(self) -> Iterator[tuple[int, Hashable]]:
        if self.preprocess.crop is not None:  # every image becomes the crop's size
            yield len(self.files), self.preprocess.crop_size
            return
        for path in self.files:  # one sample per file; its size from the header alone
            yield 1, self.preprocess.output_size(path)

    def chunks(self, rows: int, start: int = 0) -> Iterator[_Chunk]:
        # One sample per file, listed sorted: sample ``start`` is file ``start``.
        for path in self.files[start:]:
            item = {self.spec.name: self.preprocess.apply(path)}
            yield _to_samples([self.spec], item, path.name, _Keys()), path.name


class _CallableSource(_Source):
    kind = "callable"

    def __init__(
        self,
        label: str,
        fn: Callable[[], Iterable[Mapping[str, Any]]],
        specs: list[InputSpec],
        keys: _Keys,
    ) -> None:
        first = _call_source(fn, label)
        # Items may be single samples or stacks, so the count is unknown until read.
        super().__init__(label, None)
        self.fn = fn
        # Peek at the first item so its structure is checked before any model runs.
        items = iter(first)
        head = next(items, None)
        if head is None:
            raise InputError(f"{label}: returned no calibration samples")
        self.specs, self.keys = specs, keys
        _to_samples(specs, *_as_item(head, 0, label), keys)
        self._first: Iterator[Mapping[str, Any]] | None = itertools.chain([head], items)

    # No `sample_runs`: a callable's items are single samples or stacks of any count, so
    # where a sample lies is known only by reading the items before it; a shard reads
    # them and drops their batches (`CalibrationData.batches`).

    def chunks(self, rows: int, start: int = 0) -> Iterator[_Chunk]:
        # The iterable made when opening serves the first pass; later passes call again.
        items, self._first = self._first, None
        if items is None:
            items = _call_source(self.fn, self.label)
        for index, item in enumerate(items):
            item, where = _as_item(item, index, self.label)
            yield _to_samples(self.specs, item, where, self.keys), where


def _chunk_samples(arrays: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


def _as_item(item: Any, index: int, label: str) -> _Chunk:
    if not isinstance(item, Mapping):
        raise InputError(
            f"{label}: item {index} is a {type(item).__name__}, "
            "expected a dict of input name -> array"
        )
    return dict(item), f"{label} item {index}"


def _call_source(fn: Callable[[], Any], label: str) -> Iterable[Mapping[str, Any]]:
    result = fn()
    if isinstance(result, Mapping) or not isinstance(result, Iterable):
        raise InputError(
            f"{label}: must return an iterable of input dicts, returned {type(result).__name__}"
        )
    return result


def _load_callable(spec: str) -> Callable[[], Any]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(
            f"calibration data '{spec}': cannot import module '{module_name}': {e}"
        ) from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise InputError(f"calibration data '{spec}': module '{module_name}' has no '{attr}'")
    if not callable(fn):
        raise InputError(f"calibration data '{spec}': '{attr}' is not callable")
    return fn


def _folder_source(
    folder: Path, specs: list[InputSpec], preprocess: ImagePreprocess | None, keys: _Keys
) -> _Source:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    kinds = {
        "npy": [p for p in files if p.suffix.lower() == ".npy"],
        "npz": [p for p in files if p.suffix.lower() == ".npz"],
        "image": [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
    }
    present = [k for k, v in kinds.items() if v]
    if not present:
        raise InputError(f"{folder}: folder has no .npy, .npz or image (jpg/png) files")
    if len(present) > 1:
        raise InputError(f"{folder}: folder mixes {' and '.join(present)} files; use one kind")
    kind = present[0]
    ignored = len(files) - len(kinds[kind])
    if ignored:
        logger.info("%s: ignoring %d file(s) that are not %s", folder, ignored, kind)
    if kind == "npz":
        return _ArraySource(str(folder), [_npz_group(p, specs, keys) for p in kinds["npz"]])
    if keys.labels is not None:
        raise InputError(f"{folder}: labels need .npz files holding the inputs and the labels")
    only = _single_input(specs, folder, "a folder of .npy files" if kind == "npy" else "images")
    if kind == "npy":
        return _ArraySource(str(folder), [_npy_group(p, only) for p in kinds["npy"]])
    if preprocess is None:
        raise InputError(
            f"{folder}: a folder of images needs preprocessing settings "
            "(resize, crop, mean/std, layout, channel order, scale)"
        )
    return _ImageSource(str(folder), kinds["image"], only, preprocess.for_input(only))


def _single_input(specs: list[InputSpec], where: Path, what: str) -> InputSpec:
    if len(specs) != 1:
        raise InputError(
            f"{where}: {what} works only for single-input models; this model has inputs "
            f"{', '.join(s.name for s in specs)} (use .npz files keyed by input name)"
        )
    return specs[0]


def _npz_group(path: Path, specs: list[InputSpec], keys: _Keys) -> _Group:
    members = {m.member: m for m in _npz_members(path)}
    labels = None
    if keys.labels is not None:
        labels = members.pop(keys.labels, None)
        if labels is None:
            raise InputError(f"{path}: no labels array '{keys.labels}'; keys: {sorted(members)}")
        if len(labels.shape) != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"{path}: labels '{keys.labels}' must be a 1-D integer array, got "
                f"{labels.dtype} {labels.shape}"
            )
    check_names(specs, members, str(path), ignore_extra=keys.ignore_extra)
    files = {spec.name: members[spec.name] for spec in specs}
    columns = list(specs)
    if labels is not None:
        files[labels.member] = labels
        columns.append(_label_spec(labels.member))
    return files, _file_layouts(columns, files, path)


def _npy_group(path: Path, spec: InputSpec) -> _Group:
    files = {spec.name: _ArrayFile.open_header(path)}
    return files, _file_layouts([spec], files, path)


def _file_layouts(
    columns: list[InputSpec], files: dict[str, _ArrayFile], path: Path
) -> dict[str, SampleLayout]:
    """How a file's arrays hold samples, from their headers alone."""
    return sample_layouts(columns, {n: (f.shape, f.dtype) for n, f in files.items()}, str(path))


def _label_spec(name: str) -> InputSpec:
    """Labels as a column read like an input: one int64 label per sample."""
    return InputSpec(name, np.dtype(np.int64), (None,))


def _make_source(
    spec: str | os.PathLike | Callable[[], Any],
    specs: list[InputSpec],
    preprocess: ImagePreprocess | None,
    keys: _Keys,
) -> _Source:
    if callable(spec) and keys.labels is not None:
        raise InputError("labels need .npz data holding the inputs and the labels")
    if callable(spec):
        return _CallableSource(getattr(spec, "__name__", repr(spec)), spec, specs, keys)
    path = Path(spec)
    if path.is_dir():
        return _folder_source(path, specs, preprocess, keys)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise InputError(
                f"{path}: calibration data must be a .npz file, a folder or module:function"
            )
        return _ArraySource(str(path), [_npz_group(path, specs, keys)])
    if is_callable_spec(spec):
        return _CallableSource(spec, _load_callable(spec), specs, keys)
    raise InputError(f"{spec}: no such file or folder (nor a module:function spec)")


def is_callable_spec(spec: Any) -> bool:
    """Whether ``spec`` is written as a ``pkg.module:fn`` data source (not whether it imports)."""
    return isinstance(spec, str) and _CALLABLE_SPEC.match(spec) is not None


# ---------------------------------------------------------------------------------------------


class Batch(dict):
    """The feeds of one model run (input name -> array), and how many samples they hold.

    Attributes:
        samples: The number of calibration samples in the run.
        labels: The samples' integer class labels, when the data was opened with labels.
        first: The index of its first sample in the data, when the data says.
    """

    def __init__(
        self,
        feeds: Mapping[str, np.ndarray],
        samples: int,
        labels: np.ndarray | None = None,
        first: int | None = None,
    ) -> None:
        super().__init__(feeds)
        self.samples = samples
        self.labels = labels
        self.first = first


def batch_samples(batch: Mapping[str, np.ndarray]) -> int:
    """Samples in one run's feeds: a `Batch` says; any other feed dict counts as one."""
    return batch.samples if isinstance(batch, Batch) else 1


class CalibrationData:
    """Calibration samples validated against a model's inputs, streamed in batches.

    A sample is one set of model inputs, each array as the model takes it (see
    `onnxq.inputs.sample_layout` for how files hold them). Samples share a run, stacked
    along axis 0, only when every input's axis 0 is dynamic and their shapes are equal;
    otherwise each sample runs alone.

    Structure (names, ranks, static dims, dtypes, emptiness) is checked when the data is
    opened, from file headers or the first item, before any model runs. Values (NaN, Inf)
    are checked per batch as it is read, before it reaches the model.

    Attributes:
        specs: The model inputs the batches are keyed by.
        batch_size: Samples per batch (the last batch may be smaller); 1 when the model
            cannot batch.
        max_samples: Upper limit on the samples used, or None for all.
        num_samples: Number of samples the batches will hold, or None when the source
            cannot tell in advance (a callable).
        samples_read: Samples yielded by the last complete pass over `batches`.
    """

    def __init__(
        self,
        source: _Source,
        specs: list[InputSpec],
        *,
        batch_size: int,
        max_samples: int | None,
        keys: _Keys = _Keys(),
        judge: bool = True,
        notes: set[str] | None = None,
    ) -> None:
        self._source = source
        self._keys = keys
        # Whether a full pass judges the values (a `take` sees too few samples to); what
        # was said already, shared with `take`'s copies so that each line comes once.
        self._judge = judge
        self._notes: set[str] = set() if notes is None else notes
        self._ranges: dict[str, tuple[float, float, float]] = {}
        self.specs = specs
        self._batchable = can_batch(specs)
        self.batch_size = batch_size if self._batchable else 1
        self.max_samples = max_samples
        n = source.num_samples
        if n is not None and max_samples is not None:
            n = min(n, max_samples)
        self.num_samples = n
        self.samples_read: int | None = None
        self._head: list[Batch] | None = None
        self._head_asked = 0

    def __repr__(self) -> str:
        count = "unknown number of" if self.num_samples is None else self.num_samples
        return (
            f"CalibrationData({self._source.kind} '{self._source.label}', {count} samples, "
            f"batch_size={self.batch_size})"
        )

    @property
    def num_batches(self) -> int | None:
        """Number of batches ``batches()`` yields, when the sample count is known."""
        if self.num_samples is None:
            return None
        return -(-self.num_samples // self.batch_size)

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Yields batches keyed by input name, cast to the inputs' dtypes.

        Only the pending samples of one batch are held besides the batch being built; each
        batch is a fresh array that the caller may drop.

        Args:
            start: The first batch to yield, by its index in a whole pass (a shard of
                sharded calibration). Files (arrays, npz, images) start there without
                decoding the samples before it: their headers tell where it lies. A
                callable's items are read and their batches dropped.
            stop: The batch to stop before (None: to the end). Files are read no
                further than its first sample.

        Raises:
            InputError: The data is empty, or holds NaN/Inf, or a later item does not
                match the model inputs.
        """
        if stop is not None and stop <= start:
            return
        runs = self._source.sample_runs() if start or stop is not None else None
        if runs is None:
            for index, batch in enumerate(self._batches(0)):
                if index >= start:
                    yield batch
                if stop is not None and index + 1 >= stop:
                    return
            return
        skip, end = self._sample_bounds(runs, start, stop)
        if skip is not None:  # else the shard starts past the data's end
            yield from self._batches(skip, end)

    def _sample_bounds(
        self, runs: Iterator[tuple[int, Hashable]], start: int, stop: int | None
    ) -> tuple[int | None, int | None]:
        """The first samples of batches ``start`` and ``stop`` (None: past the end)."""
        if self.batch_size == 1:  # every sample is a batch, whatever its shape
            count = self.num_samples
            assert count is not None  # a source with runs knows its count
            return (
                start if start < count else None,
                stop if stop is not None and stop < count else None,
            )
        starts = _batch_starts(runs, self.batch_size, self.max_samples)
        later = itertools.islice(starts, start, None)
        skip = next(later, None)
        if stop is None or skip is None:
            return skip, None
        return skip, next(itertools.islice(later, stop - start - 1, None), None)

    def _batches(self, skip: int, end: int | None = None) -> Iterator[Batch]:
        """`batches` from sample ``skip`` to sample ``end`` (None: to the end or the limit)."""
        pending: list[dict[str, np.ndarray]] = []
        pending_count = 0
        sample = skip
        limit = self.max_samples if end is None else end
        self._ranges = {}
        for chunk, _ in self._source.read(self.batch_size, skip):
            count = len(next(iter(chunk.values())))
            # Samples of different shapes (dynamic dims) cannot share a batch.
            if pending and _sample_shapes(pending[0]) != _sample_shapes(chunk):
                yield self._emit(pending, sample - pending_count)
                pending, pending_count = [], 0
            while count:
                take = min(count, self.batch_size - pending_count)
                if limit is not None:
                    take = min(take, limit - sample)
                    if take <= 0:
                        break
                pending.append({n: a[:take] for n, a in chunk.items()})
                chunk = {n: a[take:] for n, a in chunk.items()}
                count, pending_count, sample = count - take, pending_count + take, sample + take
                if pending_count == self.batch_size:
                    yield self._emit(pending, sample - pending_count)
                    pending, pending_count = [], 0
            if limit is not None and sample >= limit:
                break
        self.samples_read = sample
        if pending:
            yield self._emit(pending, sample - pending_count)
        if sample == 0:
            raise InputError(f"{self._source.label}: calibration data has no samples")
        if self._judge and not skip and end is None:  # judged on whole passes only
            self._judge_values(sample)

    def _say_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._notes:
            self._notes.add(key)
            logger.warning(message, *args)

    def _judge_values(self, samples: int) -> None:
        """Warns about float inputs whose values cannot stand for real ones.

        The fidelity check runs on the same data, so it cannot catch this: a model
        calibrated on zeros or on values around 1e30 passes its own check and then
        clips or crushes every real input.
        """
        for name, (lo, hi, magnitude) in self._ranges.items():
            if samples >= 2 and lo == hi:
                self._say_once(
                    f"constant:{name}",
                    "calibration input '%s' is constant (every value is %g in %d samples): "
                    "int8 ranges calibrated on it cannot represent other inputs",
                    name,
                    lo,
                    samples,
                )
            elif magnitude > ABSURD_MAGNITUDE:
                self._say_once(
                    f"magnitude:{name}",
                    "calibration input '%s' has values up to %.3g in magnitude (over %g): "
                    "is it scaled as the model expects? int8 steps sized for it crush "
                    "ordinary inputs",
                    name,
                    magnitude,
                    ABSURD_MAGNITUDE,
                )

    def __iter__(self) -> Iterator[Batch]:
        """Iterates over `batches`: the data is an iterable of feed dicts, like any other."""
        return self.batches()

    def hold(self, max_bytes: int) -> None:
        """Keeps the samples in memory once read, when they take at most ``max_bytes``.

        Every later read (another pass, `head`, `take`, and the views they make) then comes
        from memory: a compile decodes its data once. Data larger than ``max_bytes`` (a
        folder of many images) stays streamed, never held whole.
        """
        self._source.hold(max_bytes, self.num_samples)

    @property
    def resident_bytes(self) -> int:
        """Bytes the data holds in memory, or may come to hold in its next pass (see `hold`)."""
        return self._source.resident_bytes

    def head(self, count: int, *, judge: bool = False) -> list[Batch]:
        """The first ``count`` samples, one per run: what the checks after compiling run on.

        Read once and kept: a later call for as many samples or fewer reuses them (they are
        held anyway while the checks run on them).

        Args:
            count: Samples (fewer when the data has fewer).
            judge: Warn about values that cannot stand for real inputs (see `batches`),
                when the samples are read now.

        Raises:
            InputError: See `batches`.
        """
        if self._head is None or (len(self._head) < count and self._head_asked < count):
            view = CalibrationData(
                self._source,
                self.specs,
                batch_size=1,
                max_samples=count,
                keys=self._keys,
                judge=judge,
                notes=self._notes,
            )
            self._head, self._head_asked = list(view.batches()), count
        return self._head[:count]

    def take(self, count: int) -> Batch:
        """Returns the first batch of at most ``count`` samples.

        It holds fewer when the data has fewer, when the model cannot batch, or when the
        second sample's shapes differ from the first's.

        Raises:
            InputError: See `batches`.
        """
        first = CalibrationData(
            self._source,
            self.specs,
            batch_size=count,
            max_samples=count,
            keys=self._keys,
            judge=False,
            notes=self._notes,
        )
        return next(first.batches())

    def _columns(self) -> list[InputSpec]:
        """The model inputs, and the labels when there are any."""
        if self._keys.labels is None:
            return self.specs
        return [*self.specs, _label_spec(self._keys.labels)]

    def _emit(self, pieces: list[dict[str, np.ndarray]], first_sample: int) -> Batch:
        batch = {}
        for spec in self._columns():
            parts = [p[spec.name] for p in pieces]
            stack = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if spec.name != self._keys.labels:
                self._check_cast(spec, stack)
            stack = conform(spec, stack, logger)
            _check_finite(spec.name, stack, first_sample)
            if spec.name != self._keys.labels and np.issubdtype(stack.dtype, np.floating):
                self._track(spec.name, stack)
            # Samples run together along the model's axis 0, or (unbatchable) one at a time.
            # (A reshape, not stack[0], keeps a scalar input an array.)
            batch[spec.name] = stack.reshape(
                (-1, *stack.shape[2:]) if self._batchable else stack.shape[1:]
            )
        labels = batch.pop(self._keys.labels) if self._keys.labels is not None else None
        samples = sum(len(next(iter(p.values()))) for p in pieces)
        return Batch(batch, samples, labels, first=first_sample)

    def _check_cast(self, spec: InputSpec, stack: np.ndarray) -> None:
        """Says (once per input) when data is cast; refuses integers the cast would wrap."""
        if stack.dtype == spec.dtype or stack.size == 0:
            return
        if np.issubdtype(spec.dtype, np.integer) and np.issubdtype(stack.dtype, np.integer):
            info = np.iinfo(spec.dtype)
            lo, hi = int(stack.min()), int(stack.max())
            if lo < info.min or hi > info.max:
                raise InputError(
                    f"calibration input '{spec.name}': values {lo}..{hi} do not fit its type "
                    f"{spec.dtype} (the data is {stack.dtype})"
                )
        if not self._judge:
            return
        self._say_once(
            f"cast:{spec.name}",
            "calibration input '%s': %s data is cast to %s, the model's type",
            spec.name,
            stack.dtype,
            spec.dtype,
        )

    def _track(self, name: str, stack: np.ndarray) -> None:
        if stack.size == 0:
            return
        lo, hi = float(stack.min()), float(stack.max())
        if name in self._ranges:
            old_lo, old_hi, _ = self._ranges[name]
            lo, hi = min(lo, old_lo), max(hi, old_hi)
        self._ranges[name] = (lo, hi, max(abs(lo), abs(hi)))


def split_batches(batches: Iterable[Mapping[str, np.ndarray]], size: int | None) -> Iterator[Any]:
    """Yields the batches, each cut into runs of at most ``size`` samples (views, no copy).

    Only a `Batch` whose arrays list its samples on axis 0, one row each, is cut; any
    other batch runs whole. The same batches and size always give the same runs, so a
    later check can run exactly the runs calibration made.
    """
    for batch in batches:
        count = batch_samples(batch)
        if (
            size is None
            or count <= size
            or not isinstance(batch, Batch)
            or any(np.ndim(a) == 0 or len(a) != count for a in batch.values())
        ):
            yield batch
            continue
        for start in range(0, count, size):
            part = {name: array[start : start + size] for name, array in batch.items()}
            labels = None if batch.labels is None else batch.labels[start : start + size]
            yield Batch(part, min(size, count - start), labels)


def _batch_starts(
    runs: Iterable[tuple[int, Hashable]], batch_size: int, limit: int | None
) -> Iterator[int]:
    """The first sample of each batch `CalibrationData` makes from samples in ``runs``.

    Mirrors how its ``_batches`` cuts samples: a batch holds ``batch_size`` samples, ends
    early where the sample shape changes, and the samples stop at ``limit``.
    """
    pending, shape, sample = 0, None, 0
    for count, key in runs:
        if not count:
            continue
        if pending and key != shape:
            pending = 0
        while count and (limit is None or sample < limit):
            if not pending:
                yield sample
                shape = key
            take = min(count, batch_size - pending)
            if limit is not None:
                take = min(take, limit - sample)
            count, sample, pending = count - take, sample + take, pending + take
            if pending == batch_size:
                pending = 0
        if limit is not None and sample >= limit:
            return


def can_batch(specs: list[InputSpec]) -> bool:
    """Whether samples can share a run: every input's axis 0 is dynamic."""
    return all(s.shape and not isinstance(s.shape[0], int) for s in specs)


def _sample_shapes(chunk: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {n: a.shape[1:] for n, a in chunk.items()}


def _check_finite(name: str, stack: np.ndarray, first_sample: int) -> None:
    """Rejects NaN/Inf in a stack of samples (axis 0), naming the first bad sample."""
    if not np.issubdtype(stack.dtype, np.floating) or np.isfinite(stack).all():
        return
    bad = ~np.isfinite(stack.reshape(len(stack), -1)).all(axis=1)
    index = int(np.argmax(bad))
    what = "NaN" if np.isnan(stack[index]).any() else "Inf"
    raise InputError(f"calibration input '{name}' has {what} in sample {first_sample + index}")


def open_calibration_data(
    spec: str | os.PathLike | Callable[[], Iterable[Mapping[str, Any]]],
    model: ir.Model,
    *,
    batch_size: int = 8,
    max_samples: int | None = None,
    preprocess: ImagePreprocess | None = None,
    labels_key: str | None = None,
    ignore_extra: bool = False,
    judge: bool = True,
) -> CalibrationData:
    """Opens calibration data and checks it against the model's inputs.

    Args:
        spec: One of: a ``.npz`` file keyed by input name; a folder of ``.npy`` files
            (single-input models), of ``.npz`` files (e.g. one sample each, of any sizes
            the model accepts), or of images (``preprocess`` required); a
            ``pkg.module:fn`` string or a callable returning an iterable of input dicts.
            How an array holds samples: `onnxq.inputs.sample_layout`.
        model: The model the data is for.
        batch_size: Samples per batch, when the model can batch (every input's axis 0
            dynamic); otherwise samples run one at a time.
        max_samples: Use at most this many samples.
        preprocess: Image preprocessing, required for image folders.
        labels_key: Key of 1-D integer class labels in the ``.npz`` data; each batch then
            carries its samples' labels (`Batch.labels`).
        ignore_extra: Ignore keys that name no model input (a data set's other columns)
            instead of rejecting them (calibration data should hold inputs only).
        judge: Warn (once per input) when a full pass finds values that cannot stand for
            real inputs (constant, or beyond `ABSURD_MAGNITUDE`) and when data is cast;
            False when the same data was judged already.

    Returns:
        The validated data source.

    Raises:
        InputError: The data cannot be read, is empty, or does not match the model inputs.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise InputError(f"max samples must be >= 1, got {max_samples}")
    specs = input_specs(model)
    if not specs:
        raise InputError("the model has no inputs to calibrate")
    if not can_batch(specs) and batch_size > 1:
        logger.info("the model's inputs have no dynamic axis 0: samples run one at a time")
    keys = _Keys(labels_key, ignore_extra)
    source = _make_source(spec, specs, preprocess, keys)
    if source.num_samples == 0:
        raise InputError(f"{source.label}: calibration data has no samples")
    data = CalibrationData(
        source, specs, batch_size=batch_size, max_samples=max_samples, keys=keys, judge=judge
    )
    logger.info("Calibration data: %r", data)
    return data
