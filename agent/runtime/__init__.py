"""Runtime backends: the interface, the registry by name, and the `local` and `podman`
backends (with the bind mounts and the JupyterLab wrapper they use)."""

from agent.runtime.base import (
    BindMount,
    ExitStatus,
    LabelledTool,
    Runtime,
    RuntimeHandle,
    RuntimeOptions,
    StartSpec,
    free_tcp_port,
)
from agent.runtime.registry import create_runtime, runtime_class, runtime_names

__all__ = [
    "BindMount",
    "ExitStatus",
    "LabelledTool",
    "Runtime",
    "RuntimeHandle",
    "RuntimeOptions",
    "StartSpec",
    "create_runtime",
    "free_tcp_port",
    "runtime_class",
    "runtime_names",
]
