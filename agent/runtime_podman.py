"""Placeholder registration of the podman backend: named, but not built yet."""

from __future__ import annotations

from agent.errors import RuntimeUnavailable
from agent.runtime import Runtime, RuntimeOptions, register_runtime

__all__ = ["create_podman_runtime"]


def create_podman_runtime(options: RuntimeOptions) -> Runtime:
    raise RuntimeUnavailable("podman runtime not available in this build")


register_runtime("podman", create_podman_runtime)
