"""Who may call, and how much they may send, decided before the body is read.

:class:`Gatekeeper` is ASGI middleware in front of every route: it names the caller from the
bearer token (:mod:`pacsfetch.tokens`, constant-time compare) and answers ``401`` at once
when there is none, then answers ``413`` for a body over ``[api] max_body_bytes``, from its
``Content-Length`` alone or after reading no more than the limit. FastAPI resolves
dependencies only after it has read and parsed the whole body, which is why this cannot be
a dependency: a 200 MB body was read and parsed before its ``401``.

Routes then ask for a scope with :func:`authorize` (by method), and find the caller with
:func:`current_caller` (what a job's ``created_by`` records; a feature recording who created
its own records takes ``CallerDep`` the same way).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pacsfetch.tokens import ANONYMOUS, TOKEN_ENV, TOKENS_ENV, Caller, TokenBook

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/healthz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json"})
"""Answered without a token: probes, scrapers, and the API's own description."""

_bearer = HTTPBearer(auto_error=False, description=f"A token from {TOKEN_ENV}, {TOKENS_ENV} "
                     "or `[api] tokens_file`; required once any is configured.")


async def _answer(send: Send, code: int, detail: str,
                  headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": code, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if kind.lower() == "bearer" and token.strip() else None
    return None


class Gatekeeper:
    """ASGI middleware: authentication and the body-size limit (see the module docstring)."""

    def __init__(self, app: ASGIApp, tokens: TokenBook, max_body_bytes: int) -> None:
        self.app = app
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        caller = ANONYMOUS
        if self.tokens and scope["path"] not in OPEN_PATHS:
            token = _bearer_token(scope)
            found = self.tokens.identify(token) if token is not None else None
            if found is None:
                await _answer(send, status.HTTP_401_UNAUTHORIZED,
                              "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")])
                return
            caller = found
        scope.setdefault("state", {})["caller"] = caller
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit():
                await _answer(send, status.HTTP_400_BAD_REQUEST, "bad Content-Length")
                return
            if int(declared) > self.max_body_bytes:
                await self._too_large(send)
                return
        if scope["method"] in ("GET", "HEAD", "OPTIONS") and declared is None:
            await self.app(scope, receive, send)
            return
        body = await self._read_bounded(receive)
        if body is None:
            await self._too_large(send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _too_large(self, send: Send) -> None:
        await _answer(send, status.HTTP_413_CONTENT_TOO_LARGE,
                      f"request body larger than {self.max_body_bytes} bytes "
                      "([api] max_body_bytes)")

    async def _read_bounded(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit (the rest is not read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # what comes after the body: a disconnect

    return replay


async def current_caller(request: Request) -> Caller:
    """The caller :class:`Gatekeeper` named (``anonymous`` while no token is configured)."""
    return getattr(request.state, "caller", ANONYMOUS)


CallerDep = Annotated[Caller, Depends(current_caller)]


def _check(caller: Caller, scope: str) -> None:
    if not caller.can(scope):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"token {caller.name!r} lacks the {scope!r} scope")


async def require_admin(caller: CallerDep) -> None:
    """Route dependency for what reaches a whole archive (creating and steering migrations):
    the ``admin`` scope, beyond the router's ``submit``."""
    _check(caller, "admin")


async def authorize(request: Request, caller: CallerDep,
                    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Router dependency: ``read`` for GET, ``submit`` for anything else."""
    _check(caller, "read" if request.method in ("GET", "HEAD") else "submit")
