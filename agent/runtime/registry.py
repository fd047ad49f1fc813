"""Runtime backends by name: a plain table, resolved on use, so the interface and the
backends never import each other in a circle."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from agent.errors import RuntimeUnavailable
from agent.runtime.base import Runtime, RuntimeOptions

__all__ = ["RuntimeFactory", "create_runtime", "runtime_class", "runtime_names"]

RuntimeFactory = Callable[[RuntimeOptions], Runtime]

# name -> (module, class, factory): imported on use, so a host without a backend's
# libraries can still run the others.
_BACKENDS = {
    "local": ("agent.runtime.local", "LocalRuntime", "create_local_runtime"),
    "podman": ("agent.runtime.podman", "PodmanRuntime", "create_podman_runtime"),
}


def runtime_names() -> list[str]:
    return sorted(_BACKENDS)


def _entry(name: str) -> tuple[str, str, str]:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise RuntimeUnavailable(
            f"unknown runtime {name!r} (known: {', '.join(runtime_names())})"
        ) from None


def runtime_class(name: str) -> type[Runtime]:
    """The backend's class, to ask it whether it is usable here (`available`)."""
    module, cls, _ = _entry(name)
    found: type[Runtime] = getattr(importlib.import_module(module), cls)
    return found


def create_runtime(name: str, options: RuntimeOptions) -> Runtime:
    module, _, factory = _entry(name)
    make: RuntimeFactory = getattr(importlib.import_module(module), factory)
    return make(options)
