"""Who is calling: named API tokens with scopes, and the names services act under.

Tokens come from the environment (``PACSFETCH_API_TOKEN``: one token named ``default`` with
every scope; ``PACSFETCH_API_TOKENS``: ``NAME:SCOPES:TOKEN`` entries separated by white
space) or from ``[api] tokens_file``, which holds only SHA-256 digests, one token a line::

    # name   scopes        digest
    ris      submit,read   sha256:9f86d0818...

A digest suffices because tokens are random (``pacsfetch token add`` makes 256-bit ones):
there is nothing to guess that a slow hash would protect. Every presented token is
compared with every known digest in constant time, so neither timing nor order tells
which name a token was close to.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "PACSFETCH_API_TOKEN"
TOKENS_ENV = "PACSFETCH_API_TOKENS"

SCOPES = ("submit", "read", "admin")
"""``read``: GET endpoints; ``submit``: POST and DELETE (submit, cancel, echo); ``admin``:
everything, including what other features reserve for it."""

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class TokenError(ValueError):
    """A token entry cannot be used; the message names where it came from."""


@dataclass(frozen=True)
class Caller:
    """A named principal: a token's owner, or a service of pacsfetch itself."""

    name: str
    scopes: frozenset[str]

    def can(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Caller("anonymous", frozenset(SCOPES))
"""Every caller while no token is configured (authentication off)."""
HL7_LISTENER = Caller("hl7-listener", frozenset({"submit"}))
"""What the HL7 order listener's prefetch jobs record as ``created_by``."""
SCHEDULER = Caller("scheduler", frozenset({"submit"}))
"""What the scheduler's duties (migrations, prefetch sweeps) record as ``created_by``."""


def hash_token(token: str) -> str:
    """The digest a tokens file stores for *token*."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def _scopes(text: str, where: str) -> frozenset[str]:
    scopes = frozenset(s for s in text.split(",") if s)
    unknown = sorted(scopes - set(SCOPES))
    if not scopes or unknown:
        raise TokenError(f"{where}: scopes must be some of {', '.join(SCOPES)}, "
                         f"got {text!r}")
    return scopes


def _name(text: str, where: str) -> str:
    if not _NAME.fullmatch(text):
        raise TokenError(f"{where}: a token name is 1-64 letters, digits, '.', '_' or '-'")
    return text


@dataclass(frozen=True)
class _Entry:
    caller: Caller
    digest: bytes


class TokenBook:
    """The known tokens; :meth:`identify` says whose a presented token is."""

    def __init__(self, entries: Iterable[tuple[Caller, str]] = ()) -> None:
        self._entries: list[_Entry] = []
        for caller, digest in entries:
            if any(e.caller.name == caller.name for e in self._entries):
                raise TokenError(f"token name {caller.name!r} is given twice")
            self._entries.append(_Entry(caller, digest.encode()))

    def __bool__(self) -> bool:
        return bool(self._entries)

    @property
    def names(self) -> list[str]:
        return [e.caller.name for e in self._entries]

    def identify(self, token: str) -> Caller | None:
        """The caller *token* belongs to, or None; compares with every entry, always."""
        digest = hash_token(token).encode()
        found = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry.caller
        return found


def read_tokens_file(path: Path) -> list[tuple[Caller, str]]:
    """The entries of a tokens file; raises :class:`TokenError` naming the bad line."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path} line {number}"
        parts = line.split()
        if len(parts) != 3 or not _DIGEST.fullmatch(parts[2]):
            raise TokenError(f"{where}: expected 'NAME SCOPES sha256:HEX' "
                             "(make one with `pacsfetch token add`)")
        entries.append((Caller(_name(parts[0], where), _scopes(parts[1], where)), parts[2]))
    return entries


def env_tokens(environ: dict[str, str] | None = None) -> list[tuple[Caller, str]]:
    """Tokens given in the environment, as (caller, digest)."""
    environ = dict(os.environ) if environ is None else environ
    entries = []
    if environ.get(TOKEN_ENV):
        entries.append((Caller("default", frozenset(SCOPES)), hash_token(environ[TOKEN_ENV])))
    for number, item in enumerate(environ.get(TOKENS_ENV, "").split(), start=1):
        where = f"{TOKENS_ENV} entry {number}"
        parts = item.split(":", 2)
        if len(parts) != 3 or not parts[2]:
            raise TokenError(f"{where}: expected NAME:SCOPES:TOKEN")
        entries.append((Caller(_name(parts[0], where), _scopes(parts[1], where)),
                        hash_token(parts[2])))
    return entries


def load_tokens(tokens_file: Path | None, environ: dict[str, str] | None = None) -> TokenBook:
    """Every configured token: the environment's, then the file's."""
    entries = env_tokens(environ)
    if tokens_file is not None:
        entries += read_tokens_file(tokens_file)
    return TokenBook(entries)


def add_token(path: Path, name: str, scopes: str) -> str:
    """Make a random token for *name*, append its digest to *path*; returns the token,
    which is shown once and stored nowhere."""
    caller = Caller(_name(name, "name"), _scopes(scopes, "scopes"))
    if path.exists() and name in TokenBook(read_tokens_file(path)).names:
        raise TokenError(f"{path} already has a token named {name!r}")
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(f"{caller.name} {','.join(sorted(caller.scopes))} {hash_token(token)}\n")
    return token
