"""Sessions: the manager reconciles desired against observed state; one runner per
session carries out its start and stop and owns its watchers and checkpointer."""

from agent.sessions.context import SessionSettings
from agent.sessions.handle import SessionHandle, SessionSpec
from agent.sessions.manager import SessionManager
from agent.sessions.runner import SessionRunner

__all__ = ["SessionHandle", "SessionManager", "SessionRunner", "SessionSettings", "SessionSpec"]
