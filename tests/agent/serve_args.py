"""`studio-agent serve` argv for tests that start the agent as a real process."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["AGENT_CLI", "serve_args"]

# The agent's command line as this interpreter runs it (the venv's, with the repo on it).
AGENT_CLI = [sys.executable, "-m", "agent.cli"]


def serve_args(tmp_path: Path, *extra: str) -> list[str]:
    """`serve` (without `AGENT_CLI`) against a controller that is not there: for refusals
    at start-up and for what the agent does before it ever connects. The state directory
    is `tmp_path / "state"`; the token file (`tmp_path / "t"`) holds no real token."""
    token = tmp_path / "t"
    token.write_text("x")
    return [
        "serve",
        "--controller",
        "127.0.0.1:1",
        "--token-file",
        str(token),
        "--compute-env",
        "0123456789abcdef",
        "--state-dir",
        str(tmp_path / "state"),
        *extra,
    ]
