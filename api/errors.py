"""Error answers that stay small, valid JSON and honest about whose fault it was.

FastAPI's default ``422`` echoes each offending ``input`` back: a 10 MB list of UIDs came
back whole, and a ``NaN`` in the body could not be encoded at all (a ``500``). Here an
input is shown only when it is a short scalar; anything else is described by its type
and size. A Redis that cannot be reached answers ``503`` on every endpoint, not ``500``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

MAX_SHOWN_INPUT = 100
"""Characters of an offending input a 422 shows; enough to recognise it."""


def shown_input(value: Any) -> Any:
    """What a 422 may echo of *value*: a short scalar as it is, else a description."""
    if value is None or isinstance(value, bool | int) and abs(value) < 2**63:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_SHOWN_INPUT else value[:MAX_SHOWN_INPUT] + "…"
    size = f" of {len(value)}" if hasattr(value, "__len__") else ""
    return f"<{type(value).__name__}{size}>"


def _trimmed(error: dict[str, Any]) -> dict[str, Any]:
    error = {k: v for k, v in error.items() if k != "ctx" or isinstance(v, dict)}
    if "input" in error:
        error["input"] = shown_input(error["input"])
    if "ctx" in error:
        error["ctx"] = {k: shown_input(v) if not isinstance(v, str | int) else v
                        for k, v in error["ctx"].items()}
    return error


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [_trimmed(dict(e)) for e in exc.errors()[:20]]
    return JSONResponse(jsonable_encoder({"detail": detail}),
                        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _redis_down(request: Request,
                      exc: redis.ConnectionError | redis.TimeoutError) -> JSONResponse:
    log.warning("request failed: Redis unreachable",
                extra={"path": request.url.path, "reason": type(exc).__name__})
    return JSONResponse({"detail": "the job store (Redis) is unavailable"},
                        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                        headers={"Retry-After": "5"})


def install(app: FastAPI) -> None:
    """Register the handlers on *app*."""
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    # Only an unreachable Redis: a command Redis refuses (ResponseError) is our bug, a 500.
    for unreachable in (redis.ConnectionError, redis.TimeoutError):
        app.add_exception_handler(unreachable, _redis_down)  # type: ignore[arg-type]
