"""What the configured stores hold of a study: the question behind "skip what is already
there" (migrations, prefetch of priors) and "prove it arrived" (a migration's verification).

Each store answers from itself (a filesystem or bucket listing, a C-FIND against a DICOM
destination, QIDO-RS against a STOW-RS one), never from our job records, because what
counts is what the store holds now. A store that cannot tell answers None ("unknown"), and
unknown never counts as held: the work is then done again rather than skipped wrongly.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable

from pydantic import BaseModel

from pacsfetch.config import Config
from pacsfetch.errors import RetrieveError
from pacsfetch.plugins.registry import Registry, get_registry

log = logging.getLogger(__name__)

_settings_cache: dict[int, tuple[Config, dict[str, BaseModel]]] = {}


def _store_settings(config: Config, registry: Registry) -> dict[str, BaseModel]:
    """The validated store settings of *config* (validated once per config object)."""
    cached = _settings_cache.get(id(config))
    if cached is None or cached[0] is not config:
        cached = (config, registry.check_config(config))
        _settings_cache[id(config)] = cached
    return cached[1]


def study_inventory(config: Config, store_name: str, study_uid: str,
                    registry: Registry | None = None) -> frozenset[str] | None:
    """SOP Instance UIDs of *study_uid* that store *store_name* holds; None when the store
    cannot tell (its plugin has no inventory, its layout cannot be listed per study, a DICOM
    destination capped its answer).

    Raises :class:`RetrieveError` when the store cannot be asked at all (unreachable)."""
    registry = registry or get_registry()
    settings = _store_settings(config, registry)[store_name]
    backend = registry.store_backends[config.stores[store_name].plugin]
    inventory = getattr(backend, "study_inventory", None)
    if inventory is None:
        return None
    result: frozenset[str] | None = inventory(store_name, settings, study_uid)
    return result


def missing_from(config: Config, stores: Iterable[str], study_uid: str,
                 expected: Collection[str], registry: Registry | None = None
                 ) -> frozenset[str] | None:
    """Which of the *expected* SOP Instance UIDs some store lacks; None when one cannot tell."""
    missing: set[str] = set()
    for store in stores:
        held = study_inventory(config, store, study_uid, registry)
        if held is None:
            return None
        missing.update(uid for uid in expected if uid not in held)
    return frozenset(missing)


def held_by_all(config: Config, stores: Iterable[str], study_uid: str,
                expected: int | Collection[str], registry: Registry | None = None) -> bool:
    """Whether every store holds the whole study: all *expected* SOP Instance UIDs, or at
    least *expected* instances when only the count is known (a study-level C-FIND's
    NumberOfStudyRelatedInstances). An unknown or unreachable store holds nothing, and a
    count of 0 proves nothing, so both answer False (the study is fetched)."""
    for store in stores:
        try:
            held = study_inventory(config, store, study_uid, registry)
        except RetrieveError as exc:
            log.warning("store inventory failed; treating the study as not held", extra={
                "store": store, "error_kind": exc.kind.value})
            return False
        if held is None:
            return False
        if isinstance(expected, int):
            if expected <= 0 or len(held) < expected:
                return False
        elif not expected or not held.issuperset(expected):
            return False
    return True
