"""Schemathesis hooks of tests/controller/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

The run authenticates as one user with one API token. Deleting that token, or the user's
own participation in the workspace, or demoting it, would leave every later request a 401
or 404 and the rest of the run blind. Those few path values (STUDIOS_FUZZ_PROTECTED, JSON
``{"tokenId": 3, "participantId": 1}``) are swapped for ids that do not exist, and leaving
the workspace goes to one that does not exist; every other value, valid or not, goes out
as generated.
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis

PROTECTED: dict[str, Any] = json.loads(os.environ.get("STUDIOS_FUZZ_PROTECTED", "{}"))
LEAVE_WORKSPACE = "/orgs/{orgId}/workspaces/{workspaceId}/participants"
ABSENT = 2**31 - 1


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    query = case.query
    if case.method.upper() == "GET" and query and query.get("wait") is not None:
        # A long-poll (`?wait=`) holds its answer for up to `timeout` seconds, 60 at most:
        # fuzzed, that is minutes of a one-worker run spent waiting. A second still
        # exercises the wait; its waking is tested in test_lifecycle_conveniences.
        # Absent is the default, 30 s; a value that is not a number is answered at once.
        timeout = query.get("timeout")
        if timeout is None or (isinstance(timeout, int) and timeout > 1):
            query["timeout"] = 1
    parameters = case.path_parameters
    if case.method.upper() not in ("DELETE", "PUT") or not parameters:
        return
    for name, value in PROTECTED.items():
        if str(parameters.get(name)) == str(value):
            parameters[name] = ABSENT
    if case.method.upper() == "DELETE" and case.path == LEAVE_WORKSPACE:
        parameters["workspaceId"] = ABSENT
