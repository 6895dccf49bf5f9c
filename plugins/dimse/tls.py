"""DICOM TLS (PS3.15 Annex B) with Python's ``ssl``: contexts from ``[sources.X.tls]``
and ``[receiver.tls]``."""

from __future__ import annotations

import ssl

from pacsfetch.config import TlsConfig


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """Towards a PACS: verify it (``ca_file``, else the system's trust store), and present
    our certificate where one is configured."""
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return ctx


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """For the move receiver: our certificate; with ``ca_file``, client certificates signed
    by that CA are required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if tls.cert_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls.ca_file:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
