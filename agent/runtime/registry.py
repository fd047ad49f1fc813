"""Runtime backends by name: a plain table, resolved on use, so the interface and the
backends never import each other in a circle."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from agent.errors import RuntimeUnavailable
from agent.runtime.base import Runtime, RuntimeOptions

__all__ = ["RuntimeFactory", "create_runtime", "runtime_names"]

RuntimeFactory = Callable[[RuntimeOptions], Runtime]

# name -> "module:factory"
_BACKENDS = {
    "local": "agent.runtime.local:create_local_runtime",
    "podman": "agent.runtime.podman:create_podman_runtime",
}


def runtime_names() -> list[str]:
    return sorted(_BACKENDS)


def create_runtime(name: str, options: RuntimeOptions) -> Runtime:
    try:
        module, factory = _BACKENDS[name].split(":")
    except KeyError:
        raise RuntimeUnavailable(
            f"unknown runtime {name!r} (known: {', '.join(runtime_names())})"
        ) from None
    make: RuntimeFactory = getattr(importlib.import_module(module), factory)
    return make(options)
