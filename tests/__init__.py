"""The test suite: tests/agent and tests/controller mirror the packages, tests/e2e runs
whole stacks; the harnesses (fakes, fixtures, servers) live here."""

from pathlib import Path

# The repository's root, wherever a test module sits below tests/.
REPO_ROOT = Path(__file__).resolve().parent.parent
