"""The Celery app of the workers: ``celery -A pacsfetch.workers.celery_app worker`` works too.

Loading the configuration and the plugins here, at import, means a bad config or a missing
plugin stops the worker before it takes any job, with a message naming the key.
"""

from __future__ import annotations

from celery.signals import worker_process_shutdown

from pacsfetch.config import load_config
from pacsfetch.logs import configure_logging
from pacsfetch.metrics import forget_process
from pacsfetch.plugins.registry import get_registry
from pacsfetch.queue import make_celery
from pacsfetch.workers import lifecycle

config = load_config()
registry = get_registry()
store_settings = registry.check_config(config)
configure_logging()
app = make_celery(config)
lifecycle.connect_worker(app, config)  # SIGTERM drains; consumer loop beats for /healthz


@worker_process_shutdown.connect
def _forget_metrics_of_exiting_child(pid: int, **_: object) -> None:
    """A pool child that exits must not keep adding its live gauges to the worker's sum."""
    forget_process(pid)


# Register the tasks on this app.
from pacsfetch.workers import tasks  # noqa: F401  (registers the tasks on the app)
