"""Send a folder of DICOM files with pacsfetch's forward store, as ``storescu +sd`` does.

``python -m benchmarks.forward --ae-title AE --port P FOLDER``: one store session (the
``dicom`` plugin, as a job uses it), every file staged and committed in turn, each identity
read from the file the way the instance pipeline reads it. The benchmark times this whole
process beside DCMTK ``storescu`` sending the same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pacsfetch.plugins.contracts import IncomingInstance
from pacsfetch.plugins.dicomfile import read_identity
from pacsfetch.plugins.stores.dicom_forward import DicomForwardBackend, DicomForwardSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ae-title", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    settings = DicomForwardSettings(ae_title=args.ae_title, host=args.host, port=args.port,
                                    calling_ae_title="PFBENCH")
    session = DicomForwardBackend().open("bench", settings, "benchmark")
    sent = 0
    try:
        for path in sorted(p for p in args.folder.rglob("*") if p.is_file()):
            instance = IncomingInstance(read_identity(path), path, path.stat().st_size)
            session.commit(session.write(instance))
            sent += 1
        session.sync()
    finally:
        session.close()
    print(f"sent {sent} instance(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
