"""``pacsfetch``: run the API or a worker, retrieve inline, or talk to the API."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar

from pacsfetch import __version__
from pacsfetch.config import ConfigError, load_config
from pacsfetch.models import JobRequest, JobStatus, Level, Progress

if TYPE_CHECKING:  # imported where used: `pacsfetch retrieve` needs no HTTP client
    import httpx

API_URL_ENV = "PACSFETCH_API_URL"
TOKEN_ENV = "PACSFETCH_API_TOKEN"
EXIT_CODES = {JobStatus.SUCCEEDED: 0, JobStatus.FAILED: 1, JobStatus.PARTIAL: 3,
              JobStatus.CANCELLED: 4}

console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]pacsfetch:[/] {message}")
    sys.exit(code)


def _job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that describe a retrieve, shared by ``retrieve`` and ``submit``."""
    options = [
        click.option("--source", required=True, help="A [sources.NAME] of the config."),
        click.option("--study", "study_uid", required=True, help="Study Instance UID."),
        click.option("--series", "series_uid", help="Series Instance UID (level SERIES)."),
        click.option("--sop", "sop_uids", multiple=True, help="SOP Instance UID (repeat; level IMAGE)."),
        click.option("--level", type=click.Choice([lv.value for lv in Level], case_sensitive=False),
                     help="Default: IMAGE with --sop, SERIES with --series, else STUDY."),
        click.option("--store", "stores", required=True, multiple=True,
                     help="A [stores.NAME] of the config (repeat to write to several)."),
        click.option("--transport", default="auto", show_default=True,
                     help="auto, or one of the source's transports."),
        click.option("--priority", type=click.IntRange(0, 9), default=5, show_default=True,
                     help="0 lowest, 9 most urgent."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _request(source: str, study_uid: str, series_uid: str | None, sop_uids: tuple[str, ...],
             level: str | None, stores: tuple[str, ...], transport: str, priority: int) -> JobRequest:
    chosen = level.upper() if level else ("IMAGE" if sop_uids else "SERIES" if series_uid else "STUDY")
    try:
        return JobRequest(source=source, level=Level(chosen), study_uid=study_uid,
                          series_uid=series_uid, sop_uids=list(sop_uids),
                          **({"store": stores[0]} if len(stores) == 1 else {"stores": list(stores)}),
                          transport=transport, priority=priority)
    except ValueError as exc:
        _fail(f"invalid job:\n{exc}")


def _progress_bar() -> Bar:
    return Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("instances  {task.fields[megabytes]:.1f} MB"), TimeElapsedColumn(),
               console=console, transient=False)


def _advance(bar: Bar, task: Any, progress: Progress, final: bool = False) -> None:
    known = progress.remaining is not None
    total = progress.completed + (progress.remaining or 0) if known or final else None
    bar.update(task, completed=progress.completed, total=total, megabytes=progress.bytes / 1e6)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pacsfetch")
def main() -> None:
    """Retrieve DICOM studies from PACS nodes with C-GET (and more transports via plugins).

    Configuration is one TOML file named by PACSFETCH_CONFIG (default ./pacsfetch.toml).
    Run `pacsfetch api` and `pacsfetch worker` for the queued service, or
    `pacsfetch retrieve` for a one-off retrieve without any broker.
    """


@main.command("check-config")
def check_config() -> None:
    """Validate the configuration and the plugins it names, then exit."""
    from pacsfetch.plugins.registry import get_registry

    config = _load()
    try:
        get_registry().check_config(config)
    except ConfigError as exc:
        _fail(f"configuration error in {exc}")
    console.print(f"[green]ok[/]: {len(config.sources)} source(s), {len(config.stores)} store(s)")


def _load():  # type: ignore[no-untyped-def]
    try:
        return load_config()
    except ConfigError as exc:
        _fail(f"configuration error in {exc}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="API processes; one spends about 2 ms of CPU per POST /jobs.")
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    import uvicorn

    from pacsfetch.api.app import create_app
    from pacsfetch.logs import configure_logging

    config = _load()
    configure_logging()
    try:
        app = create_app(config)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_config=None)
    else:  # each process builds its own app from the (now validated) config
        uvicorn.run("pacsfetch.api.app:create_app", factory=True, workers=workers, host=host,
                    port=port, log_config=None)


@main.command()
@click.option("--concurrency", "-c", type=int, help="Worker processes (default: worker.concurrency).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Celery node name (default pacsfetch-<random>@host).")
def worker(concurrency: int | None, loglevel: str, hostname: str | None) -> None:
    """Run a Celery worker that executes queued retrieve jobs.

    Its metrics (summed over the pool's processes) are served on ``[metrics] worker_port``.
    """
    if _load().metrics.enabled:
        from pacsfetch.metrics_dir import prepare_multiprocess_dir

        prepare_multiprocess_dir()  # before anything imports prometheus_client
    try:
        from pacsfetch.workers.celery_app import app, config
    except ConfigError as exc:
        _fail(f"configuration error in {exc}")
    from pacsfetch.metrics import serve_worker_metrics
    from pacsfetch.queue import QUEUE

    try:
        serve_worker_metrics(config.metrics)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")
    from pacsfetch import health
    from pacsfetch.workers import lifecycle

    health.expect("worker")
    health.watch(config.broker.url, lifecycle.draining)

    app.worker_main([
        "worker", f"--concurrency={concurrency or config.worker.concurrency}",
        f"--loglevel={loglevel}", f"--queues={QUEUE}", "--prefetch-multiplier=1",
        f"--hostname={hostname or f'pacsfetch-{uuid.uuid4().hex[:6]}@%h'}", "--without-gossip",
        "--without-mingle",
    ])


@main.command()
def receiver() -> None:
    """Run the C-MOVE destination: a storage SCP on [receiver] port, shared by all workers."""
    from pacsfetch import health
    from pacsfetch.logs import configure_logging
    from pacsfetch.metrics import serve_receiver_metrics
    from pacsfetch.moves import MoveBook
    from pacsfetch.plugins.registry import get_registry
    from pacsfetch.workers import lifecycle
    from pacsfetch.workers.receiver import MoveReceiver

    config = _load()
    configure_logging()
    registry = get_registry()
    try:
        settings = registry.check_config(config)
        serve_receiver_metrics(config.metrics)
    except ConfigError as exc:
        _fail(f"configuration error in {exc}")
    health.watch(config.broker.url, lifecycle.draining)
    lifecycle.install_sigterm()  # SIGTERM drains: see pacsfetch.workers.lifecycle
    try:
        MoveReceiver(config, registry, settings, MoveBook.from_url(config.broker.url)).serve_forever()
    except KeyboardInterrupt:
        pass
    except ConfigError as exc:
        _fail(f"configuration error in {exc}")
    except OSError as exc:
        _fail(f"cannot listen on {config.receiver.bind}:{config.receiver.port}: {exc}", 1)


@main.command()
def scheduler() -> None:
    """Run the scheduler: time-driven work such as pacing migrations and starting prefetches
    before their exams. Run one; a second one stands by and takes over when the first ends."""
    import signal

    import redis

    from pacsfetch.logs import configure_logging
    from pacsfetch.workers.scheduler import Scheduler, build_duties

    config = _load()
    configure_logging()
    from pacsfetch.metrics import serve_scheduler_metrics  # prefetch: lead times, worklists

    try:
        serve_scheduler_metrics(config.metrics)
    except ConfigError as exc:
        _fail(f"configuration error in {exc}")
    client = redis.Redis.from_url(config.broker.url, decode_responses=True,
                                  socket_timeout=10, socket_connect_timeout=5)
    runner = Scheduler(client, build_duties(config))
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    try:
        runner.run_forever()
    except KeyboardInterrupt:
        runner.resign()


@main.command()
@_job_options
def retrieve(**options: Any) -> None:
    """Retrieve now, in this process, with no broker (same plugins as the workers)."""
    from pacsfetch.plugins.registry import get_registry
    from pacsfetch.workers.runner import JobRunner
    from pacsfetch.workers.state import LocalJobState

    config = _load()
    request = _request(**options)
    registry = get_registry()
    try:
        settings = registry.check_config(config)
    except ConfigError as exc:
        _fail(f"configuration error in {exc}")
    from pacsfetch.errors import RetrieveError

    with _progress_bar() as bar:
        task = bar.add_task("retrieving", total=None, megabytes=0.0)
        state = LocalJobState(on_progress=lambda p: _advance(bar, task, p))
        try:
            outcome = JobRunner(config, registry, settings).run(uuid.uuid4().hex, request, state)
        except RetrieveError as exc:
            _fail(str(exc), 1)
        _advance(bar, task, outcome.progress, final=True)
    for note in outcome.transport_notes:  # why `auto` moved on (NAT, refused contexts...)
        console.print(f"[yellow]{note.transport} gave way ({note.error_kind})[/]: "
                      f"{escape(note.error)}")
    _report(outcome.status, outcome.progress, outcome.transport, outcome.error)
    sys.exit(EXIT_CODES.get(outcome.status, 1))


def _report(status: JobStatus, progress: Progress, transport: str | None, error: str | None) -> None:
    colour = {"succeeded": "green", "partial": "yellow"}.get(status.value, "red")
    console.print(f"[bold {colour}]{status.value}[/]: {progress.completed} instance(s), "
                  f"{progress.bytes / 1e6:.1f} MB" + (f" via {transport}" if transport else ""))
    if error:
        console.print(f"[{colour}]{error}[/]")


def _client(api_url: str) -> httpx.Client:
    import httpx

    token = os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=api_url, headers=headers, timeout=30)


def _api_call(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        _fail(f"API answered {response.status_code}: {detail}", 1)
    return response.json()


api_option = click.option("--api", "api_url", envvar=API_URL_ENV, default="http://127.0.0.1:8000",
                          show_default=True, help=f"API base URL (env {API_URL_ENV}).")


@main.command()
@_job_options
@api_option
@click.option("--wait/--no-wait", default=False, help="Follow the job with a progress bar.")
def submit(api_url: str, wait: bool, **options: Any) -> None:
    """Submit a retrieve job to the API; prints the job id."""
    request = _request(**options)
    with _client(api_url) as client:
        accepted = _api_call(client.post("/jobs", json=request.model_dump(mode="json")))
        click.echo(accepted["id"])
        if wait:
            _follow(client, accepted["id"])


def _follow(client: httpx.Client, job_id: str) -> NoReturn:
    with _progress_bar() as bar:
        task = bar.add_task(f"job {job_id[:8]}", total=None, megabytes=0.0)
        while True:
            job = _api_call(client.get(f"/jobs/{job_id}"))
            final = JobStatus(job["status"]).is_final
            _advance(bar, task, Progress(**job["progress"]), final=final)
            if final:
                break
            time.sleep(0.5)
    status = JobStatus(job["status"])
    _report(status, Progress(**job["progress"]), job.get("transport"), job.get("error"))
    sys.exit(EXIT_CODES.get(status, 1))


@main.command()
@click.argument("job_id")
@api_option
@click.option("--watch", is_flag=True, help="Follow the job until it finishes.")
def status(job_id: str, api_url: str, watch: bool) -> None:
    """Show a job's status and progress (as JSON, or a live bar with --watch)."""
    with _client(api_url) as client:
        if watch:
            _follow(client, job_id)
        click.echo(json.dumps(_api_call(client.get(f"/jobs/{job_id}")), indent=2))


@main.command()
@click.argument("source")
def echo(source: str) -> None:
    """C-ECHO a configured source from this machine."""
    from pacsfetch.plugins.dimse.services import echo as dicom_echo

    config = _load()
    if source not in config.sources:
        _fail(f"unknown source {source!r}; configured: {', '.join(sorted(config.sources))}")
    result = dicom_echo(config.sources[source])
    console.print(("[green]ok[/] " if result.ok else "[red]failed[/] ")
                  + f"{result.message} ({result.elapsed_ms:.0f} ms)")
    sys.exit(0 if result.ok else 1)


# --- prefetch ------------------------------------------------------------------------------
@main.command()
def hl7() -> None:
    """Listen for HL7 orders (ORM^O01, SIU^S12) over MLLP on [hl7] port and turn them into
    prefetch requests; each message is acknowledged (AA, or AE/AR saying why)."""
    import asyncio

    from pacsfetch.logs import configure_logging
    from pacsfetch.metrics import serve_hl7_metrics
    from pacsfetch.prefetch import PrefetchStore
    from pacsfetch.retention import retention_seconds
    from pacsfetch.workers.hl7_listener import Hl7Listener

    config = _load()
    configure_logging()
    try:
        serve_hl7_metrics(config.metrics)
    except ConfigError as exc:
        _fail(f"configuration error in {exc}")
    listener = Hl7Listener(config, PrefetchStore.from_url(
        config.broker.url, retention_seconds=retention_seconds(config)))
    try:
        asyncio.run(listener.serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        _fail(f"cannot listen on {config.hl7.bind}:{config.hl7.port}: {exc}", 1)


@main.command()
@click.option("--patient-id", required=True, help="The patient whose priors to fetch.")
@click.option("--issuer", "issuer_of_patient_id", help="Issuer of Patient ID.")
@click.option("--modality", required=True, help="Modality of the coming exam, e.g. CT.")
@click.option("--description", "study_description", help="Its procedure description.")
@click.option("--accession", "accession_number", help="Its accession number.")
@click.option("--at", "scheduled_at", help="When it takes place (ISO 8601; default: now).")
@click.option("--rule", help="A [prefetch.rules.NAME] (default: the first that applies).")
@api_option
@click.option("--wait/--no-wait", default=False, help="Wait until the priors are in place.")
def prefetch(api_url: str, wait: bool, patient_id: str, issuer_of_patient_id: str | None,
             rule: str | None, **current: Any) -> None:
    """Ask the API to prefetch a patient's priors before an exam; prints the request id."""
    body = {"patient_id": patient_id, "issuer_of_patient_id": issuer_of_patient_id,
            "rule": rule, "current": {k: v for k, v in current.items() if v is not None}}
    with _client(api_url) as client:
        record = _api_call(client.post("/prefetch", json=body))
        click.echo(record["id"])
        while wait and record["status"] not in ("done", "failed", "cancelled"):
            time.sleep(1)
            record = _api_call(client.get(f"/prefetch/{record['id']}"))
    if wait:
        for cand in record["candidates"]:
            console.print(f"{cand['decision']:>9} {cand['study_date'] or '?':8} "
                          f"{','.join(cand['modalities']):8} {cand['reason']}")
        colour = "green" if record["status"] == "done" else "red"
        console.print(f"[bold {colour}]{record['status']}[/]" +
                      (f": {record['error']}" if record.get("error") else ""))
        sys.exit(0 if record["status"] == "done" else 1)


# Migrations (pacsfetch migrate, pacsfetch migration ...) live in their own module.
from pacsfetch.cli_migrate import migrate, migration

main.add_command(migrate)
main.add_command(migration)


@main.group()
def token() -> None:
    """Named API tokens with scopes (the file `[api] tokens_file` names; read at API start)."""


@token.command("add")
@click.argument("name")
@click.option("--scopes", default="read", show_default=True,
              help="Comma-separated: submit, read, admin (admin may do everything).")
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path),
              help="The tokens file (default: [api] tokens_file of the config).")
def token_add(name: str, scopes: str, path: Path | None) -> None:
    """Make a random token for NAME, store only its digest, print the token once."""
    from pacsfetch.tokens import TokenError, add_token

    path = path or _load().api.tokens_file
    if path is None:
        _fail("no tokens file: give --file, or set [api] tokens_file")
    try:
        secret = add_token(path, name, scopes)
    except TokenError as exc:
        _fail(str(exc))
    console.print(f"added {name!r} to {path}; the token (shown only now):")
    click.echo(secret)


@token.command("hash")
def token_hash() -> None:
    """Read a token on standard input, print the digest a tokens file line holds."""
    from pacsfetch.tokens import hash_token

    secret = sys.stdin.readline().strip()
    if not secret:
        _fail("no token on standard input")
    click.echo(hash_token(secret))
