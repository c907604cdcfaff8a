"""Turn "which block / which option file" (safe to pass around) into settings with secrets.

Flow parameters and task inputs only ever carry these descriptions; passwords are read inside
the task that needs them, so they never reach Prefect's parameters, results or cache keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from blocks.mariadb import MariaDBConnection
from blocks.swift import SwiftTarget
from undercloud_backup.config import database_settings, swift_settings_from_env
from undercloud_backup.core.sizes import parse_size
from undercloud_backup.db.connection import DatabaseSettings
from undercloud_backup.store.swift import SwiftSettings


@dataclass(frozen=True)
class DatabaseSource:
    """A saved block's name, or an option file; host/port/user/socket override either."""

    block: str | None = None
    defaults_file: str | None = None
    host: str | None = None
    port: int | None = None
    user: str | None = None
    socket: str | None = None

    def settings(self) -> DatabaseSettings:
        overrides = {"host": self.host, "port": self.port, "user": self.user,
                     "socket": self.socket}
        if self.block:
            base = MariaDBConnection.load(self.block).settings()
            return replace(base, **{k: v for k, v in overrides.items() if v is not None})
        return database_settings(self.defaults_file, **overrides)


@dataclass(frozen=True)
class SwiftSource:
    """A saved block's name, or the ``OS_*`` environment; container and sizes override."""

    block: str | None = None
    container: str | None = None
    segment_size: str | None = None
    retries: int | None = None
    timeout: float | None = None
    retry_budget_s: float | None = None

    def settings(self) -> SwiftSettings:
        overrides = {"container": self.container, "retries": self.retries,
                     "timeout": self.timeout, "retry_budget_s": self.retry_budget_s,
                     "segment_size": parse_size(self.segment_size) if self.segment_size else None}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if self.block:
            return replace(SwiftTarget.load(self.block).settings(), **overrides)
        return swift_settings_from_env(**overrides)
