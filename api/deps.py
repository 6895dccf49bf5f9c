"""Request-scoped access to what the app was built with.

These are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency
in its thread pool, a hand-off per dependency per request (about a tenth of the CPU of a
``POST /jobs`` when measured).
"""

from __future__ import annotations

from celery import Celery
from fastapi import Request

from pacsfetch.api.submit import GroupCommit
from pacsfetch.config import Config
from pacsfetch.jobstore import JobStore


async def get_config(request: Request) -> Config:
    return request.app.state.config


async def get_jobstore(request: Request) -> JobStore:
    return request.app.state.jobstore


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_submitter(request: Request) -> GroupCommit:
    return request.app.state.submitter
