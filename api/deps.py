"""Request-scoped access to what the app was built with."""

from __future__ import annotations

from celery import Celery
from fastapi import Request

from pacsfetch.config import Config
from pacsfetch.jobstore import JobStore


def get_config(request: Request) -> Config:
    return request.app.state.config


def get_jobstore(request: Request) -> JobStore:
    return request.app.state.jobstore


def get_celery(request: Request) -> Celery:
    return request.app.state.celery
