"""A user plugin package written to disk, for the plugin tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

PLUGIN_SOURCE = '''
import onnx_ir as ir

from onnxq.plugins import register_pass


@register_pass
class NegateOutputPass(ir.passes.InPlacePass):
    """Appends a Neg to the graph output (a plugin's pass)."""

    exact = False  # changes the outputs on purpose

    def call(self, model):
        graph = model.graph
        old = graph.outputs[0]
        node = ir.node("Neg", [old], name="negate_output")
        node.outputs[0].name = "negated"
        node.outputs[0].shape, node.outputs[0].type = old.shape, old.type
        graph.append(node)
        graph.outputs[0] = node.outputs[0]
        return ir.passes.PassResult(model, modified=True)
'''


def write_plugin(root: Path, package: str = "myplugins") -> str:
    """Writes ``<root>/<package>/negate.py`` (a plugin module) and returns its module name."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text("")
    (root / package / "negate.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    return f"{package}.negate"
