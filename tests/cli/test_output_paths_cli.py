"""No output may overwrite an input, or another output: every command, every output flag."""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from classifier_fixtures import dataset, write_pair

from onnxq.errors import EXIT_USAGE


@pytest.fixture
def files(tmp_path) -> Path:
    """ref/cand models, data.npz (x, y), calib.npz (x), ext.onnx + ext.onnx.data, masks,
    ranges, a config and a factory module, all in tmp_path."""
    ref, _, _ = write_pair(tmp_path)
    x, _ = dataset()
    np.savez(tmp_path / "calib.npz", x=x)
    proto = onnx.load(ref)
    onnx.save(
        proto,
        tmp_path / "ext.onnx",
        save_as_external_data=True,
        size_threshold=0,
        location="ext.onnx.data",
    )
    np.savez(tmp_path / "masks.npz", W=np.ones((8, 6), np.float32))
    (tmp_path / "ranges.json").write_text("{}")
    (tmp_path / "cfg.toml").write_text("[tool.onnxq]\n")
    (tmp_path / "factory_mod.py").write_text(
        textwrap.dedent(
            """
            def make():
                raise AssertionError("export must be refused before building the model")
            """
        )
    )
    return tmp_path


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()
    }


CALIB = ("--calibration-data", "calib.npz")
PAIR = ("ref.onnx", "cand.onnx", "--data", "data.npz")
GATE = ("gate", *PAIR, "--min-sqnr", "1")

# (command line with paths relative to the fixture's folder, the flag named in the error)
CASES = {
    # compile: -o, --save-ranges, --report, --markdown, --html against each kind of input
    "compile -o calibration": (("compile", "ref.onnx", *CALIB, "-o", "calib.npz"), "-o"),
    "compile -o model": (("compile", "ref.onnx", *CALIB, "-o", "ref.onnx"), "-o"),
    # The user's code, given by module name, is an input as much as a file path is.
    "compile --report metric module": (
        (
            "compile",
            "ref.onnx",
            *CALIB,
            "-o",
            "o.onnx",
            "--metric",
            "factory_mod:make",
            "--report",
            "factory_mod.py",
        ),
        "--report",
    ),
    "compile -o plugin module": (
        ("compile", "ref.onnx", *CALIB, "--plugin", "factory_mod", "-o", "factory_mod.py"),
        "-o",
    ),
    "compile -o pass module": (
        ("compile", "ref.onnx", *CALIB, "--pass", "factory_mod:make", "-o", "factory_mod.py"),
        "-o",
    ),
    "compile -o data function module": (
        ("compile", "ref.onnx", "--calibration-data", "factory_mod:make", "-o", "factory_mod.py"),
        "-o",
    ),
    "compile -o external data": (
        ("compile", "ext.onnx", *CALIB, "-o", "ext.onnx.data"),
        "external data",
    ),
    "compile --save-ranges model": (
        ("compile", "ref.onnx", *CALIB, "-o", "o.onnx", "--save-ranges", "ref.onnx"),
        "--save-ranges",
    ),
    "compile --save-ranges --ranges": (
        (
            "compile",
            "ref.onnx",
            "--ranges",
            "ranges.json",
            "-o",
            "o.onnx",
            "--save-ranges",
            "ranges.json",
        ),
        "--save-ranges",
    ),
    "compile --report model": (
        ("compile", "ref.onnx", *CALIB, "-o", "o.onnx", "--report", "ref.onnx"),
        "--report",
    ),
    "compile --html model": (
        ("compile", "ref.onnx", *CALIB, "-o", "o.onnx", "--html", "ref.onnx"),
        "--html",
    ),
    "compile --markdown calibration": (
        ("compile", "ref.onnx", *CALIB, "-o", "o.onnx", "--markdown", "calib.npz"),
        "--markdown",
    ),
    "compile -o prune masks": (
        ("compile", "ref.onnx", "--no-quantize", "--prune", "mask:masks.npz", "-o", "masks.npz"),
        "-o",
    ),
    "compile --report config": (
        (
            "compile",
            "ref.onnx",
            "--config",
            "cfg.toml",
            *CALIB,
            "-o",
            "o.onnx",
            "--report",
            "cfg.toml",
        ),
        "--report",
    ),
    "compile --html eval data": (
        (
            "compile",
            "ref.onnx",
            "--prune",
            "channels:auto",
            "--max-accuracy-drop",
            "1",
            "--eval-data",
            "data.npz",
            "--labels",
            "y",
            *CALIB,
            "-o",
            "o.onnx",
            "--html",
            "data.npz",
        ),
        "--html",
    ),
    "compile --report = -o": (
        ("compile", "ref.onnx", *CALIB, "-o", "o.onnx", "--report", "o.onnx"),
        "the same file",
    ),
    "compile --markdown = --save-ranges": (
        (
            "compile",
            "ref.onnx",
            *CALIB,
            "-o",
            "o.onnx",
            "--save-ranges",
            "r.txt",
            "--markdown",
            "r.txt",
        ),
        "the same file",
    ),
    # bench: --json, --html
    "bench --json model": (("bench", "ref.onnx", "--json", "ref.onnx"), "--json"),
    "bench --html second model": (
        ("bench", "ref.onnx", "cand.onnx", "--html", "cand.onnx"),
        "--html",
    ),
    "bench --json data": (
        ("bench", "ref.onnx", "--data", "calib.npz", "--json", "calib.npz"),
        "--json",
    ),
    "bench --json external data": (("bench", "ext.onnx", "--json", "ext.onnx.data"), "--json"),
    "bench --json = --html": (
        ("bench", "ref.onnx", "--json", "b.out", "--html", "b.out"),
        "the same file",
    ),
    # eval: --json, --markdown, --html
    "eval --json candidate": (("eval", *PAIR, "--json", "cand.onnx"), "--json"),
    "eval --markdown reference": (("eval", *PAIR, "--markdown", "ref.onnx"), "--markdown"),
    "eval --html data": (("eval", *PAIR, "--html", "data.npz"), "--html"),
    "eval --json = --markdown": (
        ("eval", *PAIR, "--json", "e.out", "--markdown", "e.out"),
        "the same file",
    ),
    # gate: --json, --markdown, --junit, --html
    "gate --junit data": ((*GATE, "--junit", "data.npz"), "--junit"),
    "gate --json reference": ((*GATE, "--json", "ref.onnx"), "--json"),
    "gate --html candidate": ((*GATE, "--html", "cand.onnx"), "--html"),
    "gate --markdown config": (
        (*GATE, "--config", "cfg.toml", "--markdown", "cfg.toml"),
        "--markdown",
    ),
    "gate --junit = --json": ((*GATE, "--junit", "g.out", "--json", "g.out"), "the same file"),
    # export: -o over the module that defines the factory
    "export -o factory module": (
        ("export", "factory_mod:make", "--input-shape", "1,8", "-o", "factory_mod.py"),
        "-o",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_output_over_an_input_or_another_output_is_refused(cli, files, monkeypatch, case):
    args, flag = CASES[case]
    monkeypatch.chdir(files)
    monkeypatch.syspath_prepend(str(files))
    before = _digests(files)

    result = cli(*args)

    assert result.exit_code == EXIT_USAGE, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and flag in errors[0], result.stderr
    assert "output path is the" in errors[0] or "the same file" in errors[0]
    assert _digests(files) == before  # nothing changed, nothing written


def _link(kind: str, target: Path, link: Path) -> None:
    if kind == "symlink":
        link.symlink_to(target)
    else:
        os.link(target, link)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_output_linked_to_an_input_is_refused(cli, files, kind):
    _link(kind, files / "calib.npz", files / "alias.npz")
    before = _digests(files)
    result = cli(
        "compile", files / "ref.onnx", *CALIB[:1], files / "calib.npz", "-o", files / "alias.npz"
    )
    assert result.exit_code == EXIT_USAGE, result.output
    assert "output path is the --calibration-data" in result.stderr
    assert _digests(files) == before


def test_output_through_dotdot_and_a_symlinked_folder_is_refused(cli, files):
    (files / "sub").mkdir()
    (files / "linked").symlink_to(files)
    for output in (files / "sub" / ".." / "data.npz", files / "linked" / "data.npz"):
        result = cli(
            "eval",
            files / "ref.onnx",
            files / "cand.onnx",
            "--data",
            files / "data.npz",
            "--json",
            output,
        )
        assert result.exit_code == EXIT_USAGE, result.output
        assert "output path is the --data file" in result.stderr


def test_distinct_outputs_beside_the_inputs_are_accepted(cli, files):
    result = cli(
        "compile",
        files / "ext.onnx",
        "--calibration-data",
        files / "calib.npz",
        "-o",
        files / "o.onnx",
        "--report",
        files / "o.json",
        "--save-ranges",
        files / "r.json",
        "--no-latency-check",
    )
    assert result.exit_code == 0, result.output
    assert {"o.onnx", "o.json", "r.json"} <= {p.name for p in files.iterdir()}
