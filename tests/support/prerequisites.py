"""One rule for test prerequisites: skip locally, fail under CI.

A test that needs something the environment may lack (a ComfyUI tree, its SD1 tokenizer, ``transformers``,
chromium, the package registry...) calls :func:`missing` (or :func:`require` / :func:`require_module`)
instead of ``pytest.skip``. Locally that is a skip with the message, so a partial checkout still runs what
it can. When the ``CI`` environment variable is truthy ("1", "true", "yes", any case) it is a failure with
the same message: CI prepares every prerequisite (``scripts/setup_env.sh``), so a missing one means a
broken setup, and a silently skipped suite must never pass as green.

Skips that depend on the platform rather than on the setup (e.g. POSIX file modes on Windows) are not
prerequisites and keep plain ``pytest.mark.skipif``.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn, TypeVar

import pytest

CI_TRUE_VALUES = ("1", "true", "yes")

T = TypeVar("T")


def running_under_ci() -> bool:
    """Whether ``$CI`` is set to a truthy value ("1", "true", "yes", case and surrounding blanks ignored)."""
    return os.environ.get("CI", "").strip().lower() in CI_TRUE_VALUES


def missing(message: str) -> NoReturn:
    """Report a missing prerequisite: ``pytest.fail`` under CI, ``pytest.skip`` otherwise.

    Works in tests, fixtures and at module level (the skip is allowed there; a failure at module level is
    reported as a collection error, which fails the run as it should under CI).
    """
    if running_under_ci():
        pytest.fail(f"missing test prerequisite (CI={os.environ.get('CI')!r}, so this is not skipped): {message}",
                    pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require(value: T | None, message: str) -> T:
    """``value`` unless it is None or False, in which case :func:`missing` reports ``message``."""
    if value is None or value is False:
        missing(message)
    return value


def require_module(name: str, hint: str = "") -> ModuleType:
    """Import and return module ``name``, or report it missing (the rule-following ``pytest.importorskip``)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"cannot import {name!r} ({exc})" + (f"; {hint}" if hint else ""))
