"""The fleet manifest (a TOML file or ``[tool.onnxq.fleet]``), checked whole before any work.

A manifest lists models; each entry takes the keys of ``onnxq compile``'s config (the flag
names: ``calibration-data``, ``method``, ``min-sqnr``, ...) and a ``gate`` table with the
keys of ``onnxq gate``'s (``data``, ``labels``, ``min-sqnr``, ``max-accuracy-drop``, ...).
A ``defaults`` table (with its own ``gate``) sets keys every entry starts from. Relative
paths are relative to the manifest file::

    [defaults]
    method = "percentile"
    [defaults.gate]
    min-sqnr = 25

    [[models]]
    name = "digits"                  # default: the model file's stem
    model = "digits.onnx"
    output = "out/digits.int8.onnx"
    calibration-data = "digits.npz"  # also the gate's data, unless gate.data is set
    [models.gate]
    labels = "y"
    max-accuracy-drop = 1.0

An entry switches off what ``defaults.gate`` sets for it with ``false`` (TOML has no
null): ``gate = false`` gates that model not at all, and a gate key set to ``false``
(``min-sqnr = false``) drops the default's value of that key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from onnxq import io
from onnxq.calibration.data import is_callable_spec
from onnxq.cli import options
from onnxq.cli._config import checked_value, config_keys
from onnxq.cli.compile import RENAMED_KEYS, compile_command
from onnxq.cli.gate import gate
from onnxq.config import CompileConfig, read_pyproject_section
from onnxq.errors import InputError
from onnxq.fidelity import load_metric
from onnxq.fleet import FleetModel, GateSpec
from onnxq.gate import Thresholds
from onnxq.prune_search import is_auto

__all__ = ["Manifest", "read_manifest"]

logger = logging.getLogger(__name__)

_TOP_KEYS = ("defaults", "models")
_ENTRY_KEYS = ("name", "model", "output", "gate")
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(CompileConfig))
_GATE_REPORTS = frozenset({"json_path", "markdown_path", "junit_path", "html_path"})
_THRESHOLDS = tuple(f.name for f in dataclasses.fields(Thresholds))
# Compile options given as lists or comma-separated strings (as compile's _split reads them).
_LISTS = ("exclude", "op_types", "prune_exclude")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A checked fleet manifest.

    Attributes:
        path: The manifest file.
        models: The fleet, in manifest order, with absolute paths.
        inputs: ``(what, path)`` of every file the fleet reads, the manifest included.
        outputs: ``(what, path)`` of every file it writes.
    """

    path: Path
    models: list[FleetModel]
    inputs: list[tuple[str, Path]]
    outputs: dict[str, Path]


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Reads a fleet manifest: a TOML file, or the ``[tool.onnxq.fleet]`` of a pyproject.toml.

    Checks everything that can be checked without compiling: keys, value types, settings,
    that every input exists, and that names are unique. `onnxq.io.check_paths` on the
    result's inputs and outputs then refuses duplicate outputs and overwritten inputs.

    Raises:
        InputError: One line naming the manifest, the entry and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such manifest file")
    table = _table(path)
    unknown = sorted(set(table) - set(_TOP_KEYS))
    if unknown:
        raise InputError(
            f"{path}: unknown key '{unknown[0]}'; a manifest has {', '.join(_TOP_KEYS)}"
        )
    defaults = table.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InputError(f"{path}: 'defaults' must be a table")
    entries = table.get("models")
    if not (isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries)):
        raise InputError(f"{path}: 'models' must be a non-empty array of tables ([[models]])")
    reader = _EntryReader(path, defaults)
    models, inputs, outputs = [], [("manifest", path)], {}
    names: dict[str, int] = {}
    for i, entry in enumerate(entries):
        model, reads, writes = reader.read(i, entry)
        if model.name in names:
            raise InputError(
                f"{path}: models[{i}]: duplicate name '{model.name}' (also models"
                f"[{names[model.name]}]); give each model its own 'name'"
            )
        names[model.name] = i
        models.append(model)
        inputs += reads
        outputs.update(writes)
    return Manifest(path, models, inputs, outputs)


def _table(path: Path) -> dict[str, Any]:
    """The manifest's table: the whole file, or ``[tool.onnxq.fleet]`` of a pyproject.toml."""
    if path.name != "pyproject.toml":
        return read_pyproject_section(path, ())
    table = read_pyproject_section(path, ("tool", "onnxq", "fleet"))
    if not table:
        raise InputError(f"{path}: no [tool.onnxq.fleet] table (the fleet manifest)")
    return table


class _EntryReader:
    """Turns manifest entries into `FleetModel` s, checking each key and file."""

    def __init__(self, path: Path, defaults: dict[str, Any]) -> None:
        self.path = path
        self.base = path.parent
        self.defaults = defaults
        self.compile_ctx = click.Context(compile_command)
        self.gate_ctx = click.Context(gate)
        self.compile_keys = {
            k: o for k, o in config_keys(compile_command).items() if o.name in _CONFIG_FIELDS
        }
        self.gate_keys = {k: o for k, o in config_keys(gate).items() if o.name not in _GATE_REPORTS}
        bad = sorted(set(defaults) - {"gate"} - set(self._compile_names(defaults)))
        if bad:
            self._unknown("defaults", bad[0], "compile")

    def read(
        self, index: int, entry: dict[str, Any]
    ) -> tuple[FleetModel, list[tuple[str, Path]], dict[str, Path]]:
        """The entry's model, the files it reads and the files it writes (by what they are)."""
        name = entry.get("name")
        where = f"models[{index}]" + (f" ('{name}')" if isinstance(name, str) else "")
        for key in ("model", "output"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise InputError(f"{self.path}: {where}: '{key}' must be given, as a path")
        if name is not None and (not isinstance(name, str) or not name):
            raise InputError(f"{self.path}: {where}: 'name' must be a non-empty string")
        model = self._existing(entry["model"], where, "model")
        name = name or model.stem
        where = f"models[{index}] ('{name}')"
        output = self._resolve(entry["output"])
        settings = {k: v for k, v in self.defaults.items() if k != "gate"}
        settings.update({k: v for k, v in entry.items() if k not in _ENTRY_KEYS})
        config, reads, writes = self._config(settings, where)
        reads = [*io.model_inputs(model, f"{where} model"), *reads]
        writes = {f"{where} output": output, **writes}
        spec = None
        if entry.get("gate") is not False:  # false: this model has no gate, whatever defaults
            defaults = self._subtable(self.defaults, "defaults")
            gate_table = {**defaults, **self._subtable(entry, where)}
            gate_table = {k: v for k, v in gate_table.items() if not self._unset(k, v)}
            if gate_table or defaults:
                spec = self._gate(gate_table, config, where)
        if spec is not None:
            reads.append((f"{where} gate data", Path(spec.data)))
        job = FleetModel(name, str(model), str(output), config, spec)
        return job, reads, writes

    def _compile_names(self, table: Mapping[str, Any]) -> list[str]:
        """The keys of ``table`` that are compile settings (renamed ones included)."""
        known = set(self.compile_keys) | set(RENAMED_KEYS)
        return [k for k in table if k.replace("_", "-") in known]

    def _unknown(self, where: str, key: str, kind: str) -> None:
        known = self.compile_keys if kind == "compile" else self.gate_keys
        extra = ", ".join(_ENTRY_KEYS) + ", " if where.startswith("models") else "gate, "
        raise InputError(
            f"{self.path}: {where}: unknown key '{key}'; known: {extra}{', '.join(sorted(known))}"
        )

    def _config(
        self, settings: dict[str, Any], where: str
    ) -> tuple[CompileConfig, list[tuple[str, Path]], dict[str, Path]]:
        values: dict[str, Any] = {}
        for key, value in settings.items():
            flag = key.replace("_", "-")
            if flag in RENAMED_KEYS:
                flag = RENAMED_KEYS[flag]
                logger.warning(
                    "%s: %s: key '%s' is deprecated; write '%s'", self.path, where, key, flag
                )
            option = self.compile_keys.get(flag)
            if option is None:
                self._unknown(where, key, "compile")
            assert option is not None and option.name is not None
            value = checked_value(self.compile_ctx, option, value, f"{self.path}: {where} {key}")
            if option.name in _LISTS:
                value = tuple(v.strip() for item in value for v in item.split(",") if v.strip())
            values[option.name] = value
        reads: list[tuple[str, Path]] = []
        writes: dict[str, Path] = {}
        data = values.get("calibration")
        # A pkg.module:fn source names no file (an existing file of that name wins, as in
        # `open_calibration_data`).
        if data is not None and not (is_callable_spec(data) and not self._resolve(data).exists()):
            values["calibration"] = str(self._existing(data, where, "calibration data"))
            reads.append((f"{where} calibration data", Path(values["calibration"])))
        if values.get("ranges") is not None:
            values["ranges"] = str(self._existing(values["ranges"], where, "ranges"))
            reads.append((f"{where} ranges file", Path(values["ranges"])))
        if values.get("save_ranges") is not None:
            values["save_ranges"] = str(self._resolve(values["save_ranges"]))
            writes[f"{where} save-ranges"] = Path(values["save_ranges"])
        prune = values.get("prune")
        if prune is not None and is_auto(prune):
            raise InputError(
                f"{self.path}: {where}: prune '{prune}': the sparsity search is not run in a "
                "fleet; give a sparsity (search it once with onnxq compile --prune KIND:auto)"
            )
        if prune is not None and prune.startswith("mask:"):
            masks = self._existing(prune[len("mask:") :], where, "prune mask file")
            values["prune"] = f"mask:{masks}"
            reads.append((f"{where} prune mask file", masks))
        try:
            config = CompileConfig(**values)
            if config.quantize and config.metric:
                load_metric(config.metric)
        except InputError as e:
            raise InputError(f"{self.path}: {where}: {e}") from None
        # The user's modules are inputs too: no output may overwrite their source.
        for what, spec in (("metric", config.metric), ("calibration-data", config.calibration)):
            source = options.module_file(spec)
            if source is not None:
                reads.append((f"{where} {what} module", Path(source)))
        return config, reads, writes

    def _gate(self, table: dict[str, Any], config: CompileConfig, where: str) -> GateSpec:
        values: dict[str, Any] = {}
        for key, value in table.items():
            option = self.gate_keys.get(key.replace("_", "-"))
            if option is None:
                self._unknown(f"{where} gate", key, "gate")
            assert option is not None and option.name is not None
            values[option.name] = checked_value(
                self.gate_ctx, option, value, f"{self.path}: {where} gate {key}"
            )
        data = values.pop("data", None)
        if data is not None:
            data = str(self._existing(data, where, "gate data"))
        elif config.calibration and Path(config.calibration).suffix == ".npz":
            data = config.calibration  # the common case: judged on the calibration samples
        else:
            raise InputError(
                f"{self.path}: {where}: the gate needs data: set gate.data to an .npz keyed "
                "by the model's input names"
            )
        try:
            thresholds = Thresholds(**{k: values.pop(k, None) for k in _THRESHOLDS})
        except InputError as e:
            raise InputError(f"{self.path}: {where}: {e}") from None
        if thresholds.is_empty():
            raise InputError(
                f"{self.path}: {where}: the gate sets no threshold; set at least one of "
                + ", ".join(k.replace("_", "-") for k in _THRESHOLDS)
                + " (or gate = false for no gate)"
            )
        if thresholds.max_accuracy_drop is not None and not values.get("labels_key"):
            raise InputError(
                f"{self.path}: {where}: gate max-accuracy-drop needs labels: set gate.labels "
                "to the key of the labels in the gate data"
            )
        return GateSpec(thresholds, data, **values)

    def _subtable(self, table: Mapping[str, Any], where: str) -> dict[str, Any]:
        value = table.get("gate", {})
        if not isinstance(value, dict):
            off = ", or false for no gate" if where.startswith("models") else ""
            raise InputError(f"{self.path}: {where}: 'gate' must be a table{off}")
        return value

    def _unset(self, key: str, value: Any) -> bool:
        """Whether a gate key's ``false`` drops the value the defaults gave it.

        A flag's ``false`` is its value, not an unset; an unknown key is left for `_gate`
        to name.
        """
        option = self.gate_keys.get(key.replace("_", "-"))
        return value is False and option is not None and not option.is_flag

    def _resolve(self, value: str) -> Path:
        """``value`` as an absolute path, relative ones taken from the manifest's folder."""
        return Path(os.path.abspath(self.base / Path(value).expanduser()))

    def _existing(self, value: str, where: str, what: str) -> Path:
        path = self._resolve(value)
        if not path.exists():
            raise InputError(f"{self.path}: {where}: {what} '{value}' does not exist ({path})")
        return path
