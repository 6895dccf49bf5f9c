"""The FastAPI application factory (OpenAPI at ``/docs``)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from pacsfetch import __version__
from pacsfetch.api import errors, jobs, metrics, migrations, prefetch, sources
from pacsfetch.api.auth import Gatekeeper, authorize
from pacsfetch.api.schemas import Health
from pacsfetch.api.submit import GroupCommit
from pacsfetch.config import Config, ConfigError, load_config
from pacsfetch.jobstore import JobStore
from pacsfetch.migrations import MigrationStore
from pacsfetch.prefetch import PrefetchStore
from pacsfetch.queue import make_celery
from pacsfetch.retention import retention_seconds
from pacsfetch.tokens import TOKEN_ENV, TOKENS_ENV, TokenError, load_tokens

ANSWERS = {
    401: {"description": "No bearer token, or one no configured token matches."},
    403: {"description": "The token lacks the scope (`read` for GET, `submit` otherwise)."},
    413: {"description": "The body is larger than `[api] max_body_bytes`; it was not read."},
    503: {"description": "Redis (the job store or the queue) is unavailable; retry later."},
}
"""Answers every protected route may give, stated in the OpenAPI schema."""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    await run_in_threadpool(app.state.submitter.warm)
    # What exists now (modules, the app, pydantic schemas: ~80,000 objects) lives as long as
    # the process; kept out of the collector, a full collection no longer stalls every
    # request in flight for tens of milliseconds.
    gc.freeze()
    yield
    # Answer the submissions already taken before the process goes (a stopping pod, say).
    await run_in_threadpool(app.state.submitter.close)


def create_app(config: Config | None = None) -> FastAPI:
    """Build the API for *config* (default: the file named by ``PACSFETCH_CONFIG``)."""
    config = config or load_config()
    try:
        tokens = load_tokens(config.api.tokens_file)
    except (TokenError, OSError) as exc:
        raise ConfigError(f"api.tokens_file: {exc}") from None
    if config.api.require_token and not tokens:
        raise ConfigError(f"api.require_token is true but no token is configured ({TOKEN_ENV}, "
                          f"{TOKENS_ENV} or api.tokens_file)")
    app = FastAPI(
        lifespan=_lifespan,
        title="pacsfetch",
        version=__version__,
        description="Enqueue DICOM retrieve jobs and follow their progress.",
    )
    app.state.config = config
    app.add_middleware(Gatekeeper, tokens=tokens,  # type: ignore[arg-type]
                       max_body_bytes=config.api.max_body_bytes)
    errors.install(app)
    app.state.jobstore = JobStore.from_url(config.broker.url,
                                           retention_days=config.jobs.retention_days)
    app.state.celery = make_celery(config)
    app.state.submitter = GroupCommit(app.state.jobstore, app.state.celery)
    app.state.migrations = MigrationStore.from_url(
        config.broker.url, retention_seconds=retention_seconds(config))
    app.state.metrics = metrics.build_registry(config.broker.url, app.state.jobstore)
    protected = [Depends(authorize)]
    app.include_router(jobs.router, dependencies=protected, responses=ANSWERS)
    app.include_router(sources.router, dependencies=protected, responses=ANSWERS)
    app.include_router(migrations.router, dependencies=protected, responses=ANSWERS)
    app.state.prefetch = PrefetchStore.from_url(config.broker.url,
                                                retention_seconds=retention_seconds(config))
    app.include_router(prefetch.router, dependencies=protected, responses=ANSWERS)
    app.include_router(metrics.router)  # no token, like /healthz: see api/metrics.py

    @app.get("/healthz", response_model=Health, tags=["health"],
             responses={503: {"model": Health, "description": "Redis is unreachable."}})
    def healthz() -> Health | JSONResponse:
        """Liveness and readiness: the API is up and reaches Redis."""
        try:
            app.state.jobstore.ping()
        except Exception:
            return JSONResponse(Health(status="unavailable", redis="unreachable").model_dump(),
                                status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
        return Health(status="ok", redis="ok")

    return app
