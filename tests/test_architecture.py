"""The layering rules (import-linter contracts in pyproject.toml) hold: the same check CI runs (`lint-imports`)."""

import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(capsys):
    cli = pytest.importorskip("importlinter.cli")
    # import-linter configures logging with dictConfig, which disables every logger that exists: the tests after
    # this one (caplog) would see none of gptqlora's records. Their state is put back
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    disabled = [lg.disabled for lg in loggers]
    try:
        status = cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    finally:
        for lg, d in zip(loggers, disabled):
            lg.disabled = d
    out = capsys.readouterr().out
    assert status == 0, out
    assert "0 broken" in out and "formats imports nothing of ours KEPT" in out
