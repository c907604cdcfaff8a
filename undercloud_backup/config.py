"""Where settings come from when no Prefect block is named: ``OS_*``/``clouds.yaml`` for Swift,
a MariaDB option file (``~/.my.cnf``) for the database, as OpenStack and MariaDB users expect."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path

import yaml

from undercloud_backup.core.errors import ConfigError
from undercloud_backup.db.connection import DatabaseSettings
from undercloud_backup.store.swift import SwiftSettings, env_settings

CLOUDS_YAML_PATHS = (
    Path("clouds.yaml"),
    Path("~/.config/openstack/clouds.yaml").expanduser(),
    Path("/etc/openstack/clouds.yaml"),
)


def _from_clouds_yaml(cloud: str) -> dict[str, str]:
    for path in CLOUDS_YAML_PATHS:
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            entry = (data.get("clouds") or {}).get(cloud)
            if entry is None:
                continue
            auth = dict(entry.get("auth") or {})
            values = {k: v for k, v in auth.items() if isinstance(v, str)}
            for key in ("region_name", "interface"):
                if entry.get(key):
                    values[key] = entry[key]
            return values
    raise ConfigError(detail=f"cloud {cloud!r} (OS_CLOUD) is in no clouds.yaml")


# Swift settings the process was given by its caller (the `openstack` client's login), for
# every run and task thread of this process while they are provided.
_provided: list[SwiftSettings] = []
_provided_lock = threading.Lock()


@contextmanager
def provided_swift(settings: SwiftSettings) -> Iterator[None]:
    """While the ``with`` lasts, Swift settings that name no block are ``settings`` (the
    `openstack` client's session, its region and interface) rather than ``OS_*``."""
    with _provided_lock:
        _provided.append(settings)
    try:
        yield
    finally:
        with _provided_lock:
            _provided.remove(settings)


def swift_settings_from_env(**overrides: object) -> SwiftSettings:
    """Build Swift settings from the ones the caller provided (:func:`provided_swift`), else
    from ``OS_CLOUD``'s clouds.yaml entry, then ``OS_*`` over it."""
    with _provided_lock:
        given = _provided[-1] if _provided else None
    values: dict[str, object] = {}
    if given is not None:
        values = {f.name: getattr(given, f.name) for f in fields(SwiftSettings)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SwiftSettings(**values)  # type: ignore[arg-type]  # untyped, as below
    if os.environ.get("OS_CLOUD"):
        values.update(_from_clouds_yaml(os.environ["OS_CLOUD"]))
    values.update(env_settings())
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(SwiftSettings)}
    values = {k: v for k, v in values.items() if k in known}
    if not values.get("auth_url"):
        raise ConfigError(detail="no Swift target: name a Swift block (--swift-block) or set "
                                 "OS_AUTH_URL and the other OS_* variables (source your rc file)")
    # Untyped by nature (clouds.yaml, OS_* and the caller's overrides), filtered to the
    # fields above: SwiftSettings checks them in __post_init__, mypy cannot, hence the ignore.
    return SwiftSettings(**values)  # type: ignore[arg-type]


def database_settings(defaults_file: str | None = None, *, host: str | None = None,
                      port: int | None = None, user: str | None = None,
                      socket: str | None = None) -> DatabaseSettings:
    """An option file (``~/.my.cnf`` when present and none is named), flags over it."""
    if defaults_file is None:
        home_cnf = Path("~/.my.cnf").expanduser()
        defaults_file = str(home_cnf) if home_cnf.is_file() else None
    settings = (DatabaseSettings.from_option_file(defaults_file) if defaults_file
                else DatabaseSettings())
    return replace(settings,
                   host=settings.host if host is None else host,
                   port=settings.port if port is None else port,
                   user=settings.user if user is None else user,
                   socket=settings.socket if socket is None else socket)
