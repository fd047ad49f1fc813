"""Sessions: the manager that reconciles desired against observed state."""

from agent.sessions.manager import SessionManager

__all__ = ["SessionManager"]
