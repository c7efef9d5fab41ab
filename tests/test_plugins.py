"""Plugins: modules named by --plugin or the ``onnxq.passes`` entry points register passes."""

from __future__ import annotations

import importlib.metadata
import sys

import onnx_ir as ir
import pytest
from plugin_fixtures import write_plugin

from onnxq import plugins
from onnxq.errors import InputError
from onnxq.pipeline import available_passes
from onnxq.plugins import ENTRY_POINT_GROUP, load_plugins, resolve_pass


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> str:
    """An importable, not yet imported plugin module, and an empty registry for the test."""
    monkeypatch.setattr(plugins, "_USER_PASSES", {})
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_plugin(tmp_path)
    yield name
    for module in ("myplugins", name):
        sys.modules.pop(module, None)


def test_a_plugin_module_registers_its_passes(plugin):
    assert "TagNodesPass" not in available_passes()

    assert load_plugins([plugin], entry_points=False) == [plugin]

    stage, doc = available_passes()["TagNodesPass"]
    assert (stage, doc) == ("user", "Prefixes every node name with 'plugin_' (a plugin's pass).")
    assert type(resolve_pass("TagNodesPass")).__name__ == "TagNodesPass"


def test_entry_points_name_plugin_modules(plugin, monkeypatch):
    seen = []

    def entry_points(*, group):
        seen.append(group)
        return [importlib.metadata.EntryPoint(name="tag", value=plugin, group=group)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    assert load_plugins() == [plugin]
    assert seen == [ENTRY_POINT_GROUP]
    assert "TagNodesPass" in available_passes()


def test_entry_points_are_skipped_when_asked(monkeypatch):
    def entry_points(*, group):
        raise AssertionError("entry points were read")

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert load_plugins([], entry_points=False) == []


def test_unimportable_plugin_is_an_input_error():
    with pytest.raises(InputError, match="cannot import plugin 'no_such_plugin_xyz'"):
        load_plugins(["no_such_plugin_xyz"], entry_points=False)


def test_resolve_pass_takes_a_module_spec_too(plugin):
    pass_ = resolve_pass(f"{plugin}:TagNodesPass")
    assert isinstance(pass_, ir.passes.PassBase)


def test_resolve_pass_names_the_registered_ones(plugin, monkeypatch):
    with pytest.raises(InputError, match=r"unknown pass 'TagNodesPass'.*--plugin"):
        resolve_pass("TagNodesPass")
    load_plugins([plugin], entry_points=False)
    with pytest.raises(InputError, match=r"registered pass \(TagNodesPass\)"):
        resolve_pass("NoSuchPass")
