from __future__ import annotations

import subprocess
import sys


def test_the_cli_and_the_recipe_registry_do_not_import_torch():
    code = (
        "import sys, onnxq, onnxq.cli, onnxq.recipes, onnxq.training; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
