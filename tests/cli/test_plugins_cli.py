"""``--plugin``: a user's registered pass is listed by ``onnxq passes`` and runs in compile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from plugin_fixtures import write_plugin

from onnxq import plugins


@pytest.fixture
def conv_bn_relu_file(conv_bn_relu_model, save_onnx) -> Path:
    return save_onnx(conv_bn_relu_model, "convnet.onnx")


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> str:
    """A plugin package on sys.path, not yet imported, and an empty registry."""
    monkeypatch.setattr(plugins, "_USER_PASSES", {})
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_plugin(tmp_path, "cliplugins")
    yield name
    for module in ("cliplugins", name):
        sys.modules.pop(module, None)


def _stages(output: str) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in output.splitlines() if line[:1] != " "}


def test_passes_lists_a_plugin_pass_only_with_plugin(cli, plugin):
    assert "TagNodesPass" not in cli("passes").output

    result = cli("passes", "--plugin", plugin)

    assert result.exit_code == 0, result.output
    assert _stages(result.output)["TagNodesPass"] == "user"


def test_passes_shows_why_each_step_runs(cli):
    result = cli("passes")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    fold = next(i for i, line in enumerate(lines) if line.split()[1] == "FoldBatchNormPass")
    assert lines[fold + 1].split()[0] == "why:"
    assert "exact and free" in lines[fold + 1]
    # A pass that runs at several points gets one reason per point.
    unused = next(i for i, line in enumerate(lines) if line.split()[1] == "RemoveUnusedNodesPass")
    whys = [line for line in lines[unused + 1 : unused + 5] if line.split()[0] == "why:"]
    assert len(whys) == 4  # cleanup, after BN folding, after channel pruning, after QDQ


def test_compile_runs_a_registered_pass_by_name(cli, plugin, conv_bn_relu_file, tmp_path):
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"

    result = cli(
        "compile", "--no-quantize", conv_bn_relu_file, "-o", out, "--report", report,
        "--plugin", plugin, "--pass", "TagNodesPass",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert all(n.name.startswith("plugin_") for n in onnx.load(out).graph.node)


def test_compile_without_the_plugin_does_not_know_it(cli, plugin, conv_bn_relu_file, tmp_path):
    result = cli(
        "compile", "--no-quantize", conv_bn_relu_file, "-o", tmp_path / "o.onnx",
        "--pass", "TagNodesPass",
    )  # fmt: skip

    assert result.exit_code == 2
    assert "unknown pass 'TagNodesPass'" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_unimportable_plugin_is_a_usage_error(cli):
    result = cli("passes", "--plugin", "no_such_plugin_xyz")
    assert result.exit_code == 2
    assert "cannot import plugin 'no_such_plugin_xyz'" in result.stderr


def test_plugin_from_a_subprocess(conv_bn_relu_file, tmp_path):
    write_plugin(tmp_path, "subplugins")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONWARNINGS": "ignore"}

    def onnxq(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "onnxq", *map(str, args)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip

    listed = onnxq("passes", "--plugin", "subplugins.tag")
    assert listed.returncode == 0, listed.stderr
    assert _stages(listed.stdout)["TagNodesPass"] == "user"

    compiled = onnxq(
        "compile", "--no-quantize", conv_bn_relu_file, "-o", "out.onnx",
        "--plugin", "subplugins.tag", "--pass", "TagNodesPass",
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr
    assert all(n.name.startswith("plugin_") for n in onnx.load(tmp_path / "out.onnx").graph.node)
