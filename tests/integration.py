"""Skipping integration tests honestly.

A test that needs root, podman, PostgreSQL or the S3 server calls `require(...)`. On a
developer's machine without that component it is skipped with the reason; in CI
(`CI=true`, as `.ci/run` runs, or `STUDIOS_REQUIRE_INTEGRATION=1`) the same condition is
a failure, so a missing install step cannot hide behind a green run.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["integration_required", "require"]

_TRUE = ("1", "true", "yes", "on")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def integration_required() -> bool:
    """True in CI and wherever STUDIOS_REQUIRE_INTEGRATION is set to a true value."""
    return _flag("STUDIOS_REQUIRE_INTEGRATION") or _flag("CI")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if integration_required():
        pytest.fail(f"required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)
