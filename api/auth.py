"""Bearer-token authentication, on when ``PACSFETCH_API_TOKEN`` is set.

The token comes from the environment (a Kubernetes Secret, say), never from the config file,
and is compared in constant time.
"""

from __future__ import annotations

import hmac
import os

from fastapi import HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

TOKEN_ENV = "PACSFETCH_API_TOKEN"

_bearer = HTTPBearer(auto_error=False, description=f"Required when {TOKEN_ENV} is set.")


def api_token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


async def require_token(request: Request) -> None:
    """FastAPI dependency: reject the call unless it carries the configured token."""
    expected: str | None = request.app.state.token
    if expected is None:
        return
    credentials: HTTPAuthorizationCredentials | None = await _bearer(request)
    if credentials is None or not hmac.compare_digest(
        credentials.credentials.encode(), expected.encode()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
