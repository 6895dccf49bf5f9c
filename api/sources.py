"""``/sources``: the configured PACS nodes; C-ECHO and study C-FIND through a worker."""

from __future__ import annotations

from typing import Annotated, Any

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
    return EchoReply(**_ask_a_worker(celery, ECHO_TASK, [name], config.api.echo_timeout))


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
    reply = _ask_a_worker(celery, FIND_STUDIES_TASK,
                          [name, query.model_dump(exclude_none=True)], config.api.query_timeout)
    if not reply["ok"]:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY,
                            {"error_kind": reply["error_kind"], "error": reply["error"]})
    return StudyList.model_validate(reply["result"])


def _ask_a_worker(celery: Celery, task: str, args: list[Any], timeout: float) -> dict[str, Any]:
    """Run *task* on a worker and wait for its answer: the API never talks DICOM itself.

    Sent at the highest priority so an operator's question does not queue behind a
    migration's backlog; 504 when no worker answers in time.
    """
    result = celery.send_task(task, args=args, queue=QUEUE, priority=0)
    try:
        return dict(result.get(timeout=timeout))
    except CeleryTimeout:
        raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT,
                            f"no worker answered within {timeout:g} s") from None
    finally:
        result.forget()
