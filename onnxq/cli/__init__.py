"""The ``onnxq`` command line: the group, one module per command, shared options in ``options``."""

from __future__ import annotations

from onnxq.cli._group import main
from onnxq.cli.bench import bench
from onnxq.cli.compare import compare_command
from onnxq.cli.compile import compile_command
from onnxq.cli.compile_many import compile_many
from onnxq.cli.demo import demo
from onnxq.cli.eval import eval_command
from onnxq.cli.export import export
from onnxq.cli.gate import gate
from onnxq.cli.inspect import inspect_command
from onnxq.cli.passes import passes_command

__all__ = ["main"]

main.add_command(compile_command)
main.add_command(compile_many)
main.add_command(passes_command)
main.add_command(inspect_command)
main.add_command(export)
main.add_command(bench)
main.add_command(eval_command)
main.add_command(compare_command)
main.add_command(gate)
main.add_command(demo)
