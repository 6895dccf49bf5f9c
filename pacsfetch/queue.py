"""The contract between whoever enqueues jobs (API, CLI) and the workers that run them.

Both sides build their Celery app here so that they agree on task names, the queue and
serialisation without the API importing any worker (or DICOM) code: the API only calls
:func:`enqueue_retrieves`, which sends a task *by name*.

Settings follow Celery's advice for long tasks: a task is acknowledged only after it ran
(``acks_late``), re-queued when its worker process dies (``task_reject_on_worker_lost``), and
each worker process prefetches one message at a time so a long retrieve never holds back a
queue of others behind it.
"""

from __future__ import annotations

from celery import Celery

from pacsfetch.config import Config

RETRIEVE_TASK = "pacsfetch.retrieve"
ECHO_TASK = "pacsfetch.echo"
FIND_STUDIES_TASK = "pacsfetch.find_studies"
PREFETCH_TASK = "pacsfetch.prefetch"
PREFETCH_TASK_PRIORITY = 9
"""A prefetch search is short and someone waits for its exam: it goes ahead of every job."""
QUEUE = "pacsfetch"
PRIORITY_LEVELS = 10
QUEUE_SEP = ":"


def redis_priority(priority: int) -> int:
    """Map the API's priority (9 most urgent) onto Redis transport priority (0 first)."""
    return PRIORITY_LEVELS - 1 - priority


def priority_queue_keys() -> dict[int, str]:
    """API priority -> the Redis list holding that priority's messages of :data:`QUEUE`.

    kombu's Redis transport keeps one list per priority step: the queue's own name for
    step 0, ``<queue><sep><step>`` for the others (``sep`` is set below).
    """
    keys = {}
    for priority in range(PRIORITY_LEVELS):
        step = redis_priority(priority)
        keys[priority] = QUEUE if step == 0 else f"{QUEUE}{QUEUE_SEP}{step}"
    return keys


def make_celery(config: Config) -> Celery:
    """A Celery app bound to the configured Redis, set up for long, idempotent retrieves."""
    app = Celery("pacsfetch", broker=config.broker.url, backend=config.broker.url)
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": config.broker.visibility_timeout,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(PRIORITY_LEVELS)),
            "sep": QUEUE_SEP,
        },
        task_default_priority=redis_priority(5),
        result_expires=3600,
        task_ignore_result=True,
    )
    return app


def enqueue_retrieves(app: Celery, jobs: list[tuple[str, int]]) -> None:
    """Put recorded jobs (id, priority) on the queue: one broker connection, and one Redis
    pipeline for all of them (kombu's publish batch).

    ``ignore_result``: job state lives in the job store, and without it Celery subscribes to
    (and later unsubscribes from) a result channel per task, tripling the Redis round trips
    of ``POST /jobs``."""
    with app.producer_or_acquire() as producer, producer.batch():
        for job_id, priority in jobs:
            app.send_task(RETRIEVE_TASK, args=[job_id], queue=QUEUE,
                          priority=redis_priority(priority), producer=producer,
                          ignore_result=True)


def enqueue_prefetches(app: Celery, prefetch_ids: list[str]) -> None:
    """Send due prefetch requests to the workers (by task name, like retrieves)."""
    with app.producer_or_acquire() as producer, producer.batch():
        for prefetch_id in prefetch_ids:
            app.send_task(PREFETCH_TASK, args=[prefetch_id], queue=QUEUE,
                          priority=redis_priority(PREFETCH_TASK_PRIORITY), producer=producer,
                          ignore_result=True)
