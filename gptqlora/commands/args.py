"""Command-line arguments from dataclasses: help text from `field(metadata={"help": ...})`.

Every option is accepted as `--snake_case` and `--kebab-case`, as `--key value` or `--key=value`; booleans
also as a bare `--key` or `--no-key` and as `--key=False` (the research scripts' fire-style flags); lists
as `a,b,c` or a Python literal such as "['q_proj','v_proj']". `--config FILE.yaml` supplies defaults that
flags on the command line override.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence


class OptionError(ValueError):
    """An option value (on the command line or in a --config file) that cannot be used: one line."""


def check_range(name: str, value: Any, meta: dict, where: str = "") -> None:
    """Check `value` against a field's range metadata: `min`/`max` (inclusive), `gt`/`lt` (exclusive),
    `also` (special values allowed outside the range, e.g. -1 = "none"). Raises OptionError."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if value in meta.get("also", ()):
        return
    problems = []
    if "min" in meta and value < meta["min"]:
        problems.append(f">= {meta['min']}")
    if "gt" in meta and not value > meta["gt"]:
        problems.append(f"> {meta['gt']}")
    if "max" in meta and value > meta["max"]:
        problems.append(f"<= {meta['max']}")
    if "lt" in meta and not value < meta["lt"]:
        problems.append(f"< {meta['lt']}")
    if problems:
        allowed = " and ".join(range_text(meta))
        also = "".join(f" or {a}" for a in meta.get("also", ()))
        why = f" ({meta['why']})" if meta.get("why") else ""
        raise OptionError(f"{where}--{name.replace('_', '-')}: must be {allowed}{also}{why}, got {value}")


def range_text(meta: dict) -> list[str]:
    return [f"{op} {meta[k]}" for k, op in (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<")) if k in meta]


def ranged(tp: type, name: str, **meta: Any):
    """An argparse `type` that converts with `tp` and checks the range at parse time, e.g.
    `type=ranged(int, "batch_size", min=1)`."""
    def convert(v: str):
        try:
            value = tp(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if tp is int else 'a number'}, "
                                             f"got {v!r}") from None
        try:
            check_range(name, value, meta)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
        return value

    convert.__name__ = tp.__name__
    return convert


RANGE_KEYS = ("min", "max", "gt", "lt", "also", "why")


def shard_size(v: str) -> str:
    """An argparse `type` for --max-shard-size: '2GB', '500MB', '1GiB' or bytes."""
    from gptqlora.checkpoint.io import parse_size

    try:
        n = parse_size(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or 1GiB, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {v!r}")
    return v


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def str2list(v: str | list) -> list[str]:
    if isinstance(v, list):
        return [str(x) for x in v]
    s = v.strip()
    if s.startswith("["):
        try:
            return [str(x) for x in ast.literal_eval(s)]
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f"cannot read the list {v!r}") from None
    return [x.strip() for x in s.split(",") if x.strip()]


def _base_type(tp: Any) -> Any:
    """Optional[X] / X | None -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _converter(tp: Any):
    tp = _base_type(tp)
    if tp is bool:
        return str2bool
    if tp in (int, float, str):
        return tp
    if typing.get_origin(tp) is list or tp is list:
        return str2list
    return str


def spellings(name: str) -> list[str]:
    """`--snake_case` and `--kebab-case` for an option name (either spelling works everywhere)."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    elif "-" in name:
        names.append(f"--{name.replace('-', '_')}")
    return names


def add_option(parser: Any, name: str, *more: str, **kw: Any) -> None:
    """parser.add_argument with both spellings of `name` (and any further flags, e.g. "-o")."""
    parser.add_argument(*spellings(name), *more, **kw)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, Sequence[str]] | None = None,
                            title: str | None = None, bool_values: bool = True,
                            required: Sequence[str] = ()) -> None:
    """One option per field of `cls`: help from `metadata["help"]`, `choices`, `aliases` (more names),
    `negative` (names of flags that set a boolean False, e.g. --asym), `append` (a list field given by
    repeating its option); `cli: False` fields are left out.

    Booleans are `--key`, `--no-key` and, with `bool_values`, also `--key=false` / `--key false`; commands
    with positional arguments pass bool_values=False, so that `--desc-act MODEL_DIR` keeps MODEL_DIR.
    Options never given are absent from the parsed namespace (defaults come from the dataclass)."""
    hints = typing.get_type_hints(cls)
    doc = (cls.__doc__ or "").strip().splitlines()
    group = parser.add_argument_group(title or cls.__name__.replace("Arguments", " arguments").strip(),
                                      doc[0] if doc else None)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False:
            continue
        tp = _base_type(hints[f.name])
        names = spellings(f.name)
        for alias in (*f.metadata.get("aliases", ()), *(aliases or {}).get(f.name, ())):
            names += [n for n in spellings(alias) if n not in names]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        if default not in (None, "", []):
            help_text += f" (default: {default})"
        if tp is bool and default is True and "--no-" not in help_text:  # the --no- spelling is hidden below
            help_text += f"; off: --no-{f.name.replace('_', '-')}"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text,
                              "required": f.name in required}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            if bool_values:
                group.add_argument(*names, nargs="?", const=True, type=str2bool, metavar="BOOL", **kw)
            else:
                group.add_argument(*names, action="store_true", **kw)
            group.add_argument(*[f"--no-{n[2:]}" for n in names[:2]], dest=f.name, action="store_false",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            for neg in f.metadata.get("negative", ()):
                group.add_argument(*spellings(neg), dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                   help=f"the opposite of --{f.name.replace('_', '-')}")
        elif f.metadata.get("append"):  # a list given by repeating the option: --keep ffn --keep '.*\.0\..*'
            group.add_argument(*names, action="append", type=str, metavar=f.metadata.get("metavar", f.name.upper()),
                               **kw)
        else:
            metavar = "{" + ",".join(map(str, kw["choices"])) + "}" if "choices" in kw else f.name.upper()
            conv = _converter(hints[f.name])
            meta = {k: f.metadata[k] for k in RANGE_KEYS if k in f.metadata}
            if meta and conv in (int, float):
                conv = ranged(conv, f.name, **meta)
            group.add_argument(*names, type=conv, metavar=metavar, **kw)


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise OptionError(f"--config {path}: no such file" if not path.is_dir() else
                          f"--config {path}: is a directory, not a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise OptionError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except UnicodeDecodeError:
        raise OptionError(f"{path}: not a text file (expected YAML)") from None
    if not isinstance(data, dict):
        raise OptionError(f"{path}: expected a mapping of argument names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_dataclasses(classes: list[type], values: dict[str, Any], where: str = "") -> list[Any]:
    """Instantiate each dataclass from `values` (names for every field); unknown names are an error."""
    known = {f.name for c in classes for f in dataclasses.fields(c)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"{where}unknown argument(s): {', '.join(unknown)}; see --help for the names")
    for cls in classes:  # defaults that depend on other values (QuantizeOptions: --method spqr's group size)
        hook = getattr(cls, "dependent_defaults", None)
        if hook is not None:
            values = hook(values)
    out = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                v, conv = values[f.name], _converter(hints[f.name])
                try:
                    if isinstance(v, str) or (conv is str2list and isinstance(v, list)):
                        v = conv(v)
                    elif conv is float and isinstance(v, int) and not isinstance(v, bool):
                        v = float(v)
                except (ValueError, argparse.ArgumentTypeError) as e:
                    raise OptionError(f"{where}{f.name}: cannot read {v!r} ({e})") from None
                if conv in (int, float) and not (isinstance(v, (int, float)) and not isinstance(v, bool)) \
                        and not (v is None and _base_type(hints[f.name]) is not hints[f.name]):
                    raise OptionError(f"{where}{f.name}: expected a number, got {v!r}")
                if f.metadata.get("choices") and v not in f.metadata["choices"]:
                    choices = ", ".join(map(str, f.metadata["choices"]))
                    raise OptionError(f"{where}{f.name}: {v!r} is not one of {choices}")
                check_range(f.name, v, f.metadata, where)
                kw[f.name] = v
        out.append(cls(**kw))
    return out


def given_values(namespace: argparse.Namespace, classes: Sequence[type]) -> dict[str, Any]:
    """The options of `classes` given on the command line (those never given are absent)."""
    names = {f.name for c in classes for f in dataclasses.fields(c)}
    return {k: v for k, v in vars(namespace).items() if k in names}
