"""Lazily imported package attributes (PEP 562): a package names its public API and the module each name
lives in, and that module is imported on first use, so that importing the package (the CLI's `--help`, a
QuantConfig read) does not pull in torch, transformers or peft. Imports nothing of ours."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, api: dict[str, str]) -> Callable[[str], Any]:
    """The module `__getattr__` of `package`: `api[name]` is the module that defines `name`."""

    def __getattr__(name: str) -> Any:
        if name in api:
            return getattr(importlib.import_module(api[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
