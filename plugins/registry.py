"""Loads plugins from entry points and checks the configuration against what they provide."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

import pluggy
from pydantic import BaseModel, ValidationError

from pacsfetch import PROJECT_NAME
from pacsfetch.config import Config, ConfigError, describe_validation_error
from pacsfetch.plugins import hookspecs
from pacsfetch.plugins.contracts import StoreBackend, Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registry:
    """The plugin manager plus the transports and store backends its plugins provide."""

    hooks: pluggy.PluginManager
    transports: dict[str, Transport]
    store_backends: dict[str, StoreBackend]

    def check_config(self, config: Config) -> dict[str, BaseModel]:
        """Refuse a configuration that names a missing plugin or has a bad store key.

        Returns the validated settings of each store, by store name.
        """
        problems: list[str] = []
        for name, source in config.sources.items():
            for i, transport in enumerate(source.transports):
                if transport not in self.transports:
                    problems.append(
                        f"sources.{name}.transports[{i}]: no transport plugin named "
                        f"{transport!r} (installed: {', '.join(sorted(self.transports))})"
                    )
        settings: dict[str, BaseModel] = {}
        for name, store in config.stores.items():
            backend = self.store_backends.get(store.plugin)
            if backend is None:
                problems.append(
                    f"stores.{name}.plugin: no store plugin named {store.plugin!r} "
                    f"(installed: {', '.join(sorted(self.store_backends))})"
                )
                continue
            try:
                settings[name] = backend.settings_model.model_validate(store.settings)
            except ValidationError as exc:
                problems.append(describe_validation_error(exc, prefix=f"stores.{name}"))
        if problems:
            where = f"{config.path}:\n" if config.path else ""
            raise ConfigError(where + "\n".join(problems))
        return settings


def build_registry(plugin_manager: pluggy.PluginManager) -> Registry:
    """Collect transports and store backends, refusing duplicate names."""
    transports: dict[str, Transport] = {}
    for provided in plugin_manager.hook.pacsfetch_transports():
        for transport in provided:
            if transport.name in transports:
                raise ConfigError(f"two plugins provide a transport named {transport.name!r}")
            transports[transport.name] = transport
    backends: dict[str, StoreBackend] = {}
    for provided in plugin_manager.hook.pacsfetch_store_backends():
        for backend in provided:
            if backend.name in backends:
                raise ConfigError(f"two plugins provide a store named {backend.name!r}")
            backends[backend.name] = backend
    return Registry(plugin_manager, transports, backends)


@cache
def get_registry() -> Registry:
    """The process-wide registry of every plugin installed under the ``pacsfetch`` group."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    loaded = pm.load_setuptools_entrypoints(PROJECT_NAME)
    log.debug("loaded %d pacsfetch plugins", loaded)
    return build_registry(pm)
