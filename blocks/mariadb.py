"""The MariaDB connection block."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from undercloud_backup.config import database_settings
from undercloud_backup.database import DatabaseSettings


class MariaDBConnection(Block):
    """How the backup reaches the undercloud's MariaDB: TCP or unix socket, user and password,
    or a MariaDB option file on the worker host."""

    _block_type_name = "MariaDB Connection"
    _block_type_slug = "mariadb-connection"
    _description = "MariaDB connection for undercloud database dumps (password kept secret)."

    host: str = Field("127.0.0.1", description="Server host name or address (TCP).")
    port: int = Field(3306, description="Server TCP port.")
    socket: str | None = Field(None, description="Unix socket path; used instead of host/port.")
    user: str = Field("root", description="Database user; needs SELECT, SHOW VIEW, TRIGGER, "
                                          "EVENT, LOCK TABLES, RELOAD, PROCESS, SHOW DATABASES.")
    password: SecretStr | None = Field(None, description="Password of that user.")
    defaults_file: str | None = Field(
        None, description="A MariaDB option file on the worker host ([client] group); the "
                          "fields above, where set, override it.")

    def settings(self) -> DatabaseSettings:
        """Plain settings for the dump; the password is only read here."""
        if self.defaults_file:
            base = database_settings(self.defaults_file)
            password = self.password.get_secret_value() if self.password else base.password
            return DatabaseSettings(host=self.host, port=self.port, socket=self.socket,
                                    user=self.user, password=password)
        return DatabaseSettings(
            host=self.host, port=self.port, socket=self.socket, user=self.user,
            password=self.password.get_secret_value() if self.password else None)
