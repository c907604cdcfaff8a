"""The MariaDB connection block."""

from __future__ import annotations

from dataclasses import replace

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from undercloud_backup.config import database_settings
from undercloud_backup.db.connection import DatabaseSettings


class MariaDBConnection(Block):
    """How the backup reaches the undercloud's MariaDB: TCP or unix socket, user and password,
    or a MariaDB option file on the worker host."""

    _block_type_name = "MariaDB Connection"
    _block_type_slug = "mariadb-connection"
    _description = "MariaDB connection for undercloud database dumps (password kept secret)."

    host: str | None = Field(None, description="Server host name or address (TCP); default "
                                               "127.0.0.1, or the option file's.")
    port: int | None = Field(None, description="Server TCP port; default 3306, or the option "
                                               "file's.")
    socket: str | None = Field(None, description="Unix socket path; used instead of host/port.")
    user: str | None = Field(None, description="Database user (default root, or the option "
                                               "file's); needs SELECT, SHOW VIEW, TRIGGER, "
                                               "EVENT, SHOW DATABASES on *.* (checked before "
                                               "every dump).")
    password: SecretStr | None = Field(None, description="Password of that user.")
    defaults_file: str | None = Field(
        None, description="A MariaDB option file on the worker host ([client] group); the "
                          "fields above, where set, override it.")

    def settings(self) -> DatabaseSettings:
        """Plain settings for the dump: the option file (if any), the fields set over it.

        The password is only read here.
        """
        base = database_settings(self.defaults_file) if self.defaults_file \
            else DatabaseSettings()
        overrides = {"host": self.host, "port": self.port, "socket": self.socket,
                     "user": self.user,
                     "password": self.password.get_secret_value() if self.password else None}
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})
