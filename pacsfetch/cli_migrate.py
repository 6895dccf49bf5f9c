"""``pacsfetch migrate`` and ``pacsfetch migration ...``: migrations through the API.

Like ``submit``, these talk to the API (which records; the scheduler runs), so they work
from any machine that reaches it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar

from pacsfetch.cli import _api_call, _client, _fail, api_option, console
from pacsfetch.migrations import CSV_KEYS, CsvProblem, MigrationStatus, read_key_csv

if TYPE_CHECKING:  # the client comes from pacsfetch.cli._client
    import httpx

EXIT_CODES = {MigrationStatus.SUCCEEDED: 0, MigrationStatus.FAILED: 1,
              MigrationStatus.PARTIAL: 3, MigrationStatus.CANCELLED: 4}


def _csv_keys(path: Path, column: str) -> tuple[str, list[str]]:
    """The filter list a CSV file fills, checked here so a problem names its line."""
    try:
        field, values, _ = read_key_csv(path.read_text(encoding="utf-8-sig"), column)
    except (CsvProblem, UnicodeDecodeError) as exc:
        _fail(f"{path}: {exc}")
    return field, values


@click.command()
@click.option("--source", required=True, help="A [sources.NAME] of the config.")
@click.option("--store", "stores", required=True, multiple=True,
              help="A [stores.NAME] of the config (repeat to write to several).")
@click.option("--from", "date_from", help="First study date, YYYYMMDD.")
@click.option("--to", "date_to", help="Last study date, YYYYMMDD.")
@click.option("--modality", "modalities", multiple=True, help="Modality in study (repeat).")
@click.option("--csv", "csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A CSV file listing the studies to move (see --key).")
@click.option("--key", type=click.Choice(sorted(CSV_KEYS)), default="study_uid",
              show_default=True, help="What the CSV's column holds.")
@click.option("--transport", default="auto", show_default=True)
@click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True)
@click.option("--max-in-flight", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Study jobs queued or running at once.")
@api_option
@click.option("--wait/--no-wait", default=False,
              help="Follow the migration with a progress bar until it ends.")
def migrate(source: str, stores: tuple[str, ...], date_from: str | None, date_to: str | None,
            modalities: tuple[str, ...], csv_file: Path | None, key: str, transport: str,
            priority: int, max_in_flight: int, api_url: str, wait: bool) -> None:
    """Move an archive (or part of it) from a source into stores; prints the migration id.

    Without filters the whole archive moves. Studies the stores already hold are skipped,
    partly held ones complete, and every study is verified at the end.
    """
    flt: dict[str, Any] = {"modalities": list(modalities)}
    if date_from:
        flt["from"] = date_from
    if date_to:
        flt["to"] = date_to
    if csv_file is not None:
        field, values = _csv_keys(csv_file, key)
        flt[field] = values
    body = {"source": source, "stores": list(stores), "filter": flt, "transport": transport,
            "priority": priority, "max_in_flight": max_in_flight}
    with _client(api_url) as client:
        accepted = _api_call(client.post("/migrations", json=body))
        click.echo(accepted["id"])
        if wait:
            _follow(client, accepted["id"])


def _follow(client: httpx.Client, mig_id: str) -> NoReturn:
    """A live bar: studies done of planned, instances, MB/s and ETA, until the end."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("studies  {task.fields[instances]} instances  "
                          "{task.fields[rate]:.1f} MB/s  ETA {task.fields[eta]}  "
                          "{task.fields[status]}"), TimeElapsedColumn())
    with Bar(*columns, console=console) as bar:
        task = bar.add_task(f"migration {mig_id[:8]}", total=None, instances=0, rate=0.0,
                            eta="?", status="planning")
        while True:
            record = _api_call(client.get(f"/migrations/{mig_id}"))
            studies = record["studies"]
            eta = record.get("eta_seconds")
            bar.update(task, completed=studies["done"],
                       total=studies["planned"] if record["plan_complete"] else None,
                       instances=record["instances_moved"],
                       rate=(record.get("bytes_per_second") or 0) / 1e6,
                       eta=time.strftime("%H:%M:%S", time.gmtime(eta)) if eta else "?",
                       status=record["status"])
            status = MigrationStatus(record["status"])
            if status.is_final:
                break
            time.sleep(1.0)
    _summary(record)
    sys.exit(EXIT_CODES.get(status, 1))


def _summary(record: dict[str, Any]) -> None:
    s = record["studies"]
    colour = {"succeeded": "green", "partial": "yellow"}.get(record["status"], "red")
    console.print(f"[bold {colour}]{record['status']}[/]: {s['planned']} studies planned, "
                  f"{s['verified']} verified, {s['skipped']} skipped (already there), "
                  f"{s['mismatched']} mismatched, {s['failed']} failed; "
                  f"{record['instances_moved']} instances, {record['bytes_moved'] / 1e6:.1f} MB")
    if record.get("error"):
        console.print(f"[{colour}]{record['error']}[/]")


@click.group()
def migration() -> None:
    """List, inspect, steer and report migrations."""


@migration.command("list")
@api_option
def list_migrations(api_url: str) -> None:
    """One line per migration: id, status, source -> stores, studies done."""
    with _client(api_url) as client:
        page = _api_call(client.get("/migrations", params={"limit": 500}))
    for item in page["items"]:
        s = item["studies"]
        click.echo(f"{item['id']}  {item['status']:<15} {item['request']['source']} -> "
                   f"{','.join(item['request']['stores'])}  {s['done']}/{s['planned']} studies")


@migration.command()
@click.argument("mig_id")
@api_option
@click.option("--watch", is_flag=True, help="Follow it with a progress bar until it ends.")
def show(mig_id: str, api_url: str, watch: bool) -> None:
    """The migration as JSON (status, counts, rate, ETA)."""
    with _client(api_url) as client:
        if watch:
            _follow(client, mig_id)
        click.echo(json.dumps(_api_call(client.get(f"/migrations/{mig_id}")), indent=2))


def _control(path: str, method: str = "POST") -> Any:
    @click.argument("mig_id")
    @api_option
    def command(mig_id: str, api_url: str) -> None:
        with _client(api_url) as client:
            record = _api_call(client.request(method, f"/migrations/{mig_id}{path}"))
        _summary(record)
    return command


migration.command("pause", help="Feed no more studies (running ones finish).")(_control("/pause"))
migration.command("resume", help="Feed studies again.")(_control("/resume"))
migration.command("retry-failed", help="Queue failed and mismatched studies again.")(
    _control("/retry-failed"))
migration.command("cancel", help="Stop, and cancel the study jobs in flight.")(
    _control("", "DELETE"))


@migration.command()
@click.argument("mig_id")
@api_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the CSV here instead of to standard output.")
def report(mig_id: str, api_url: str, output: Path | None) -> None:
    """The CSV report: one row per study."""
    with _client(api_url) as client, client.stream("GET", f"/migrations/{mig_id}/report") as r:
        if r.status_code >= 400:
            r.read()
            _api_call(r)
        sink = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
        try:
            for text in r.iter_text():
                sink.write(text)
        finally:
            if output:
                sink.close()
