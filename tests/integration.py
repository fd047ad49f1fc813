"""Skipping integration tests honestly.

A test that needs root, podman, PostgreSQL or the S3 server calls `require(...)`. On a
developer's machine without that component it is skipped with the reason; in CI
(`STUDIOS_REQUIRE_INTEGRATION=1`, set by `.ci/run`) the same condition is a failure, so a
missing install step cannot hide behind a green run.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["integration_required", "require"]


def integration_required() -> bool:
    return os.environ.get("STUDIOS_REQUIRE_INTEGRATION", "") not in ("", "0", "false")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if integration_required():
        pytest.fail(f"required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)
