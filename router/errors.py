"""The router's error tree and its one mapping to OpenAI-shaped JSON.

    RouterError                      500 internal_error
    ├── InvalidRequest               400 invalid_request_error
    ├── UnknownModel                 404 model_not_found
    ├── RequestTooLarge              413 request_too_large
    ├── Unauthorized                 401 unauthorized
    ├── Forbidden                    403 forbidden
    ├── NoBackend                    503 no_backend_available
    ├── UpstreamConnectError         502 upstream_connect_error
    └── UpstreamTimeout              504 upstream_timeout

Every error a client can see goes through ``error_body``/``error_response``; nothing else in
the router builds error JSON. Must not import other ``router`` modules except
``router.http.messages``.
"""

from __future__ import annotations

import hmac
import json

from router.http.messages import Headers, Request, Response

__all__ = [
    "Forbidden",
    "InvalidRequest",
    "NoBackend",
    "RequestTooLarge",
    "RouterError",
    "Unauthorized",
    "UnknownModel",
    "UpstreamConnectError",
    "UpstreamTimeout",
    "error_body",
    "error_response",
    "http_error",
    "require_admin",
]


class RouterError(Exception):
    status = 500
    type = "internal_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(RouterError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class UnknownModel(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RequestTooLarge(RouterError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Unauthorized(RouterError):
    status = 401
    type = "authentication_error"
    code = "unauthorized"


class Forbidden(RouterError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NoBackend(RouterError):
    status = 503
    type = "service_unavailable"
    code = "no_backend_available"


class UpstreamConnectError(RouterError):
    status = 502
    type = "upstream_error"
    code = "upstream_connect_error"


class UpstreamTimeout(RouterError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


def error_body(error: RouterError) -> bytes:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return json.dumps(
        {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": error.param,
                "code": error.code,
            }
        }
    ).encode()


def error_response(error: RouterError, headers: Headers = None) -> Response:
    return Response(
        status=error.status,
        body=error_body(error),
        content_type="application/json",
        headers=headers,
    )


def http_error(status: int, message: str) -> RouterError:
    """An error the HTTP layer itself finds (bad framing, unknown path, wrong method)."""
    error = InvalidRequest(message) if status < 500 else RouterError(message)
    error.status, error.code = status, str(status)
    if status == 503:  # the server sheds load (too many bodies being received at once)
        error.type = "service_unavailable"
    return error


def require_admin(request: Request, token: str | None, what: str, *, open_without: bool) -> None:
    """Raise ``Unauthorized`` unless ``request`` carries ``Authorization: Bearer <token>``.
    Without a configured token the endpoint is open (``open_without``) or refused outright
    (``Forbidden``: what it serves must not leak from a router nobody secured)."""
    if token is None:
        if open_without:
            return
        raise Forbidden(f"{what} is disabled: set server.admin_token to enable it")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized(f"a valid admin bearer token is required for {what}")
