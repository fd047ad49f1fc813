"""The connect proxy: browsers to the tools of running sessions, by host name."""

from agent.proxy.server import ConnectProxy

__all__ = ["ConnectProxy"]
