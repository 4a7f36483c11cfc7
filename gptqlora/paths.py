"""Where commands read and write: the rules that keep every command from destroying a user's files.

Every command that writes a folder calls `check_output` before any work, then builds the folder with
`output_dir` (or `stage` + `publish`): in a temporary sibling, renamed into place only when complete.

    check_output(out, "--out", inputs={"RUN_DIR": run_dir}, overwrite=args.overwrite)
    with output_dir(out, overwrite=args.overwrite) as tmp:
        ...write into tmp...

The rules:
  - an output is never the working directory, a folder holding it, the home folder or the root;
  - an output that equals, contains or lies inside an input is refused;
  - `--overwrite` replaces only a folder that is recognisably ours (it holds MARKER, written when we made
    it) and holds nothing we did not write; anything else is refused, with or without --overwrite;
  - a folder appears only complete, with ordinary permissions (0666/0777 less the umask);
  - temporaries left by a killed process are removed by the next command writing the same output.

Inputs are local: a path that does not exist fails at once with one line (`require_dir`, `require_file`);
nothing here, or in the commands that use it, turns a missing path into a Hub download.

This module imports nothing else of gptqlora (contract in pyproject.toml), so every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Mapping

_HOST = socket.gethostname()  # a staging folder's process id means something on its own host only
MARKER = ".gptqlora.json"  # {"gptqlora": 1, "kind": ..., "entries": [...]}: written into every folder we make
_TMP, _OLD = ".tmp-", ".old-"


class PathError(ValueError):
    """A path option that cannot be used as given: one line naming the option, the path and what to do."""


class OutputExistsError(PathError, FileExistsError):
    """The output is ours and exists, and --overwrite was not given (also a FileExistsError, for callers)."""


# -- inputs ---------------------------------------------------------------------------------------------

_LOCAL_ONLY = ("gptqlora reads local folders only; to use a Hugging Face Hub model, download it first, "
               "e.g. `hf download ORG/NAME --local-dir DIR`")


def require_dir(path: str | Path, option: str, what: str = "folder") -> Path:
    """`path` as a Path if it is an existing directory; else PathError naming `option`."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise PathError(f"{option} {path}: is a file, not a {what}")
    # a run folder is made by finetune, never downloaded: the Hub hint only for models and checkpoints
    hint = f"; {_LOCAL_ONLY}" if what != "run folder" and _looks_like_hub_id(str(path)) else ""
    raise PathError(f"{option} {path}: no such {what}{hint}")


def require_file(path: str | Path, option: str, what: str = "file") -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        raise PathError(f"{option} {path}: is a directory, not a {what}")
    raise PathError(f"{option} {path}: no such {what}")


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and all(s.split("/"))


# -- outputs --------------------------------------------------------------------------------------------


def read_marker(folder: str | Path) -> dict | None:
    """The marker of a folder we made, or None (no marker, or not ours)."""
    try:
        raw = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) and "gptqlora" in raw else None


def write_marker(folder: str | Path, kind: str, **extra: object) -> None:
    """Mark `folder` as ours, listing what it holds now (what a later --overwrite may remove)."""
    folder = Path(folder)
    entries = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    marker = {"gptqlora": 1, "kind": kind, "entries": entries, **extra}
    (folder / MARKER).write_text(json.dumps(marker) + "\n")


def foreign_entries(folder: Path, expected: Iterable[str] = ()) -> list[str]:
    """Top-level entries of `folder` that we did not write (not in its marker's list, nor `expected`)."""
    marker = read_marker(folder) or {}
    ours = {MARKER, *marker.get("entries", ()), *expected}
    return sorted(p.name for p in folder.iterdir() if p.name not in ours)


def check_output(out: str | Path, option: str, inputs: Mapping[str, str | Path | None] | None = None,
                 overwrite: bool = False, kind: str = "output", expected: Iterable[str] = (),
                 exists_hint: str | None = None, reuse: bool = False) -> Path:
    """Refuse an output folder that the command must not write, before any work (see the module's rules).

    `inputs`: label (e.g. "--data train.jsonl") -> path read by the command. `expected`: names a folder of
    this kind may hold besides those its marker lists (a run grows checkpoints). `reuse`: the folder is
    continued, not replaced (resume). Returns `out` as a Path."""
    out = Path(out)
    p = out.resolve()
    cwd = Path.cwd().resolve()
    if p == cwd:
        raise PathError(f"{option} {out}: is the working directory; name a new folder for the {kind}, "
                        f"e.g. {option} {_example(kind)}")
    if p in cwd.parents or p == Path.home().resolve() or p == Path(p.anchor):
        raise PathError(f"{option} {out}: holds the working directory (or is the home or root folder); "
                        f"name a new folder for the {kind}, e.g. {option} {_example(kind)}")
    for label, path in (inputs or {}).items():
        if path is None:
            continue
        ip = Path(path).resolve()
        if p == ip:
            raise PathError(f"{option} {out}: is the input {label}; write the {kind} to another folder")
        if ip in p.parents:
            raise PathError(f"{option} {out}: lies inside the input {label}; write the {kind} elsewhere")
        if p in ip.parents:
            raise PathError(f"{option} {out}: holds the input {label}; write the {kind} to a new folder")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise PathError(f"{option} {out}: is a file, not a folder; name a folder for the {kind}")
    if not out.exists() or not any(out.iterdir()) or reuse:  # continued, not replaced: nothing is removed
        return out
    if read_marker(out) is None:
        names = sorted(x.name for x in out.iterdir())
        raise PathError(f"{option} {out}: already holds files that gptqlora did not write ({_few(names)}); "
                        f"gptqlora never replaces such a folder: choose another {option}")
    foreign = foreign_entries(out, expected)
    if foreign:
        raise PathError(f"{option} {out}: holds files that gptqlora did not write ({_few(foreign)}); move them "
                        f"out or choose another {option}")
    if not overwrite and not reuse:
        raise OutputExistsError(exists_hint or f"{option} {out}: already exists; pass --overwrite to replace it, or "
                                       f"choose another {option}")
    return out


def _example(kind: str) -> str:
    return "runs/NAME" if kind == "run" else "NEW_FOLDER"


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def stage(out: str | Path, kind: str) -> Path:
    """A new, marked temporary sibling of `out` to build it in (see `publish`); removes stale ones first."""
    out = Path(out)
    created = [str(p) for p in out.absolute().parents if not p.exists()]  # removed again by `discard`
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # mode 0777 less the umask (tempfile.mkdtemp would make it 0700)
    write_marker(tmp, kind, created_parents=created, host=_HOST)
    return tmp


def publish(tmp: Path, out: str | Path, kind: str) -> Path:
    """Put the complete folder `tmp` in place of `out` (checked by `check_output`), ordinary permissions."""
    out = Path(out)
    write_marker(tmp, kind)
    normalize_permissions(tmp)
    if out.exists():
        old = out.parent / f".{out.name}{_OLD}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def discard(tmp: Path) -> None:
    """Remove a staging folder (only ever one made by `stage`), and the parent folders `stage` created
    for it if they are empty again."""
    marker = read_marker(tmp)
    if marker is None or _TMP not in tmp.name:
        return
    shutil.rmtree(tmp, ignore_errors=True)
    for parent in marker.get("created_parents", ()):  # deepest first
        try:
            Path(parent).rmdir()
        except OSError:
            break


@contextlib.contextmanager
def output_dir(out: str | Path, overwrite: bool = False, kind: str = "output",
               option: str = "output folder", checked: bool = False) -> Iterator[Path]:
    """Yield a staging folder for `out`; on success it replaces `out`, on any error it is removed.

    `checked`: the caller already ran `check_output` (with the command's inputs) or owns the parent folder
    (a run's adapter/ and base/); otherwise the rules are checked here, without inputs."""
    if not checked:
        check_output(out, option, overwrite=overwrite, kind=kind)
    tmp = stage(out, kind)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    publish(tmp, out, kind)


def remove_stale(out: str | Path) -> list[Path]:
    """Remove our temporaries beside `out` (`.NAME.tmp-PID-*`, `.NAME.old-PID-*`, any NAME: a run named by
    the time never has the same name twice) whose process, on this host, is gone; they hold our marker."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(".*-*"):
        for tag in (_TMP, _OLD):
            head, sep, rest = p.name.rpartition(tag)
            pid = rest.split("-", 1)[0]
            if not (sep and head.startswith(".") and pid.isdigit()):
                continue
            marker = read_marker(p)
            if marker is not None and marker.get("host", _HOST) == _HOST and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            break
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_permissions(root: str | Path) -> None:
    """Files 0666 (0777 if executable) and folders 0777, less the umask: safetensors writes 0600 files,
    and a serving container running as another user must be able to read what we wrote."""
    mask = umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if os.path.islink(path):
                continue
            mode = 0o777 if os.stat(path).st_mode & 0o100 else 0o666
            os.chmod(path, mode & ~mask)
