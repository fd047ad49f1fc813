"""The controller's exception hierarchy.

One root (`StudiosError`); leaves differ by the HTTP status they map to. The
mapping to an HTTP response happens only at the boundary (the error middleware
in `controller.web_app`); gRPC code maps its own errors to status codes.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "InvalidTransition",
    "NotFound",
    "PayloadTooLarge",
    "StudiosError",
    "Unauthorized",
]


class StudiosError(Exception):
    """Root of every error the controller reports to a client."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(StudiosError):
    status = 400


class Unauthorized(StudiosError):
    status = 401


class Forbidden(StudiosError):
    status = 403


class NotFound(StudiosError):
    status = 404


class Conflict(StudiosError):
    status = 409


class PayloadTooLarge(StudiosError):
    """A request body over the limit (`controller.json_body`)."""

    status = 413


class InvalidTransition(Conflict):
    """A status change the session lifecycle does not allow."""
