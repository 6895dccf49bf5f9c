"""``/sources``: the configured PACS nodes; C-ECHO and study C-FIND through a worker."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from fastapi import APIRouter, Depends, HTTPException, Query, status

from pacsfetch.api.deps import get_celery, get_config
from pacsfetch.api.schemas import EchoReply, SourceInfo
from pacsfetch.config import Config
from pacsfetch.queue import ECHO_TASK, FIND_STUDIES_TASK, QUEUE
from pacsfetch.studyquery import StudyList, StudyQuery

router = APIRouter(prefix="/sources", tags=["sources"])


@router.get("", response_model=list[SourceInfo])
def list_sources(config: Annotated[Config, Depends(get_config)]) -> list[SourceInfo]:
    """The PACS nodes jobs may name as `source`."""
    return [
        SourceInfo(name=name, ae_title=s.ae_title, host=s.host, port=s.port,
                   calling_ae_title=s.calling_ae_title, transports=list(s.transports),
                   dicomweb_url=str(s.dicomweb_url) if s.dicomweb_url else None)
        for name, s in sorted(config.sources.items())
    ]


@router.post("/{name}/echo", response_model=EchoReply,
             responses={404: {"description": "No such source."},
                        504: {"description": "No worker answered in time."}})
def echo_source(name: str, config: Annotated[Config, Depends(get_config)],
                celery: Annotated[Celery, Depends(get_celery)]) -> EchoReply:
    """C-ECHO the source from a worker (where the DICOM network path really starts)."""
    if name not in config.sources:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no source {name!r}")
    result = celery.send_task(ECHO_TASK, args=[name], queue=QUEUE, priority=0)
    try:
        reply = result.get(timeout=config.api.echo_timeout)
    except CeleryTimeout:
        raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT,
                            f"no worker answered within {config.api.echo_timeout:g} s") from None
    finally:
        result.forget()
    return EchoReply(**reply)


@router.get("/{name}/studies", response_model=StudyList,
            responses={404: {"description": "No such source."},
                       502: {"description": "The PACS could not be queried (the reason says why)."},
                       504: {"description": "No worker answered in time."}})
def find_studies(name: str, query: Annotated[StudyQuery, Query()],
                 config: Annotated[Config, Depends(get_config)],
                 celery: Annotated[Celery, Depends(get_celery)]) -> StudyList:
    """Studies on the source matching the query keys (study-level C-FIND from a worker).

    PACS that cap their answers are paged around (see the source's `max_results`); the
    answer holds patient identifiers, exactly as asked for.
    """
    if name not in config.sources:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no source {name!r}")
    result = celery.send_task(FIND_STUDIES_TASK, args=[name, query.model_dump(exclude_none=True)],
                              queue=QUEUE, priority=0)
    try:
        reply = result.get(timeout=config.api.query_timeout)
    except CeleryTimeout:
        raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT,
                            f"no worker answered within {config.api.query_timeout:g} s") from None
    finally:
        result.forget()
    if not reply["ok"]:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY,
                            {"error_kind": reply["error_kind"], "error": reply["error"]})
    return StudyList.model_validate(reply["result"])
