"""The FastAPI application factory (OpenAPI at ``/docs``)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from pacsfetch import __version__
from pacsfetch.api import jobs, metrics, migrations, sources
from pacsfetch.api.auth import TOKEN_ENV, api_token, require_token
from pacsfetch.api.schemas import Health
from pacsfetch.api.submit import GroupCommit
from pacsfetch.config import Config, ConfigError, load_config
from pacsfetch.jobstore import JobStore
from pacsfetch.migrations import MigrationStore
from pacsfetch.queue import make_celery


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
    token = api_token()
    if config.api.require_token and token is None:
        raise ConfigError(f"api.require_token is true but {TOKEN_ENV} is not set")
    app = FastAPI(
        lifespan=_lifespan,
        title="pacsfetch",
        version=__version__,
        description="Enqueue DICOM retrieve jobs and follow their progress.",
    )
    app.state.config = config
    app.state.token = token
    app.state.jobstore = JobStore.from_url(config.broker.url)
    app.state.celery = make_celery(config)
    app.state.submitter = GroupCommit(app.state.jobstore, app.state.celery)
    app.state.migrations = MigrationStore.from_url(config.broker.url)
    app.state.metrics = metrics.build_registry(config.broker.url, app.state.jobstore)
    protected = [Depends(require_token)]
    app.include_router(jobs.router, dependencies=protected)
    app.include_router(sources.router, dependencies=protected)
    app.include_router(migrations.router, dependencies=protected)
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
