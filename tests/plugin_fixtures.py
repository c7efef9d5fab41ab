"""A user plugin package written to disk, for the plugin tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

PLUGIN_SOURCE = '''
import onnx_ir as ir

from onnxq.plugins import register_pass


@register_pass
class TagNodesPass(ir.passes.InPlacePass):
    """Prefixes every node name with 'plugin_' (a plugin's pass)."""

    def call(self, model):
        for node in model.graph:
            node.name = f"plugin_{node.name}"
        return ir.passes.PassResult(model, modified=True)
'''


def write_plugin(root: Path, package: str = "myplugins") -> str:
    """Writes ``<root>/<package>/tag.py`` (a plugin module) and returns its module name."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text("")
    (root / package / "tag.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    return f"{package}.tag"
