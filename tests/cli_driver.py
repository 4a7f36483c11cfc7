"""Run many `gptqlora` invocations in one process, each as the console entry point would run it: its own
working directory, stdout and stderr captured at the file descriptors (logging and tqdm included), an
uncaught exception printed as the interpreter would, its wall time, and whether it changed any file under
the watched folders.

    python cli_driver.py CASES.json RESULTS.json     # CASES: [{"id", "argv", "cwd", "watch": [...]}]

One process for all cases: importing torch and transformers once, not once per case, keeps a table of
dozens of invocations fast. Each command is warmed up (imported) by its first case's untimed twin.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path


def tree(root: str) -> dict[str, tuple]:
    """Every entry under `root`: files by (size, mtime_ns, mode), folders and links by mode."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, st.st_mode) if name in filenames \
                else (st.st_mode,)
    return out


def changes(before: dict, after: dict) -> list[str]:
    return sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)})


def invoke(main, argv: list[str], cwd: str) -> tuple[int, str, str, float]:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        here = os.getcwd()
        os.chdir(cwd)
        t0 = time.perf_counter()
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            rc = 1
        finally:
            seconds = time.perf_counter() - t0
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            os.chdir(here)
        out.seek(0)
        err.seek(0)
        return rc, out.read().decode(errors="replace"), err.read().decode(errors="replace"), seconds


def main() -> None:
    from gptqlora.cli import main as cli_main

    cases = json.loads(Path(sys.argv[1]).read_text())
    results, warmed = {}, set()
    for case in cases:
        command = next((a for a in case["argv"] if not a.startswith("-")), None)
        before = {w: tree(w) for w in case["watch"]}  # the warm-up run counts too
        if command not in warmed:  # import the command's modules, untimed (a cold start is import time)
            invoke(cli_main, case["argv"], case["cwd"])
            warmed.add(command)
        rc, out, err, seconds = invoke(cli_main, case["argv"], case["cwd"])
        changed = [f"{w}: {c}" for w in case["watch"] for c in changes(before[w], tree(w))]
        results[case["id"]] = {"rc": rc, "stdout": out, "stderr": err, "seconds": seconds, "changed": changed}
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
