"""`gptqlora COMMAND --help` and a parse error come at once: a command's options are declared without the
model libraries (torch, transformers, peft, accelerate, datasets), which load only when the command runs.

Checked by what a fresh interpreter has imported, not by time: a timing would pass on a fast machine
whatever is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptqlora.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets")
# --help, then an unknown option (for commands with required arguments: the missing ones), as a user types them
CODE = """
import contextlib, io, json, sys
from gptqlora.cli import main
command, heavy = sys.argv[1], sys.argv[2].split(",")
out = {}
for argv in ([command, "--help"], [command, "--no-such-option"]):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    out[argv[1]] = {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
out["loaded"] = [m for m in heavy if m in sys.modules]
print(json.dumps(out))
"""


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_and_parse_errors_import_no_model_library(tmp_path, command):
    r = subprocess.run([sys.executable, "-c", CODE, command, ",".join(HEAVY)], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["--help"]["rc"] == 0 and out["--help"]["stdout"].startswith(f"usage: gptqlora {command} ")
    error = out["--no-such-option"]
    assert error["rc"] == 2 and error["stderr"].startswith(f"gptqlora {command}: error: "), error
    assert out["loaded"] == [], f"`gptqlora {command} --help` imported {out['loaded']}"


def test_the_light_names_are_the_solvers_names():
    """`--method`'s choices are written out in quant.options (no torch); they must stay the solvers' names."""
    from gptqlora.quant.options import METHODS
    from gptqlora.quant.solvers import SOLVERS

    assert METHODS == tuple(SOLVERS)
