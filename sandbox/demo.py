"""The end-to-end demo: local Redis and Orthanc, API and worker, one job through the API.

``python -m pacsfetch.sandbox.demo`` (what ``scripts/demo.sh`` runs). Everything listens on
private loopback ports and lives under ``.demo/``; all processes stop when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import tomli_w

from pacsfetch.sandbox.peers import Orthanc, RedisServer, free_port
from pacsfetch.sandbox.samples import generate_mixed_study


def _start(args: list[str], env: dict[str, str], log: Path, stack: ExitStack) -> subprocess.Popen:
    handle = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "pacsfetch", *args], env=env,
                            stdout=handle, stderr=subprocess.STDOUT)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        handle.close()

    stack.callback(stop)
    return proc


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"API exited; see {log}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"API did not come up; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    args = parser.parse_args()
    work: Path = args.workdir.absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    study = generate_mixed_study(work / "samples")
    print(f"generated a sample study of {len(study.instances)} instances in "
          f"{len(study.series_uids)} series ({len(study.sop_class_uids)} SOP classes, "
          f"{len(study.transfer_syntax_uids)} transfer syntaxes)")

    with ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer(work / "redis"))
        orthanc = stack.enter_context(Orthanc(work / "orthanc"))
        orthanc.upload_study(study)
        print(f"Redis on {redis_server.url}, Orthanc {orthanc.aet} on DICOM port "
              f"{orthanc.dicom_port} (HTTP {orthanc.http_url}), seeded")
        config = {
            "broker": {"url": redis_server.url},
            "sources": {"orthanc": {"ae_title": orthanc.aet, "host": "127.0.0.1",
                                    "port": orthanc.dicom_port, "calling_ae_title": "PACSFETCH",
                                    "transports": ["c-get"],
                                    "dicomweb_url": orthanc.dicomweb_url}},
            "stores": {"local": {"plugin": "filesystem", "root": str(work / "store")}},
            "metrics": {"bind": "127.0.0.1", "worker_port": free_port()},
        }
        config_path = work / "pacsfetch.toml"
        config_path.write_text(tomli_w.dumps(config))
        api_port = free_port()
        api_url = f"http://127.0.0.1:{api_port}"
        env = {**os.environ, "PACSFETCH_CONFIG": str(config_path), "PACSFETCH_API_URL": api_url}
        api = _start(["api", "--port", str(api_port)], env, work / "api.log", stack)
        _start(["worker", "-c", "1"], env, work / "worker.log", stack)
        _wait_http(f"{api_url}/healthz", api, work / "api.log")
        print(f"API on {api_url} (OpenAPI at {api_url}/docs), worker started\n")
        print(f"$ pacsfetch submit --source orthanc --study {study.study_uid} --store local --wait")
        submitted = subprocess.run(
            [sys.executable, "-m", "pacsfetch", "submit", "--source", "orthanc",
             "--study", study.study_uid, "--store", "local", "--wait"],
            env=env, stdout=subprocess.PIPE, text=True,
        )
        job_id = submitted.stdout.strip().splitlines()[0] if submitted.stdout.strip() else ""
        if job_id:
            job = httpx.get(f"{api_url}/jobs/{job_id}").json()
            print("\nGET /jobs/" + job_id)
            print(json.dumps({k: job[k] for k in ("status", "transport", "progress", "error")}, indent=2))
        files = sorted(p for p in (work / "store").rglob("*.dcm"))
        print(f"\n{len(files)} files under {work / 'store'}:")
        for path in files[:5]:
            print("  " + path.relative_to(work / "store").as_posix())
        if len(files) > 5:
            print(f"  ... and {len(files) - 5} more")
        metrics_url = f"http://127.0.0.1:{config['metrics']['worker_port']}/metrics"
        print(f"\nfrom the worker's metrics ({metrics_url}):")
        for line in httpx.get(metrics_url).text.splitlines():
            if line.startswith(("pacsfetch_instances_stored_total", "pacsfetch_jobs_finished_total")):
                print("  " + line)
        sys.exit(submitted.returncode)


if __name__ == "__main__":
    main()
