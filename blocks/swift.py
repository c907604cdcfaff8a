"""The Swift target block: Keystone v3 credentials and where backups go."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from undercloud_backup.core import defaults
from undercloud_backup.core.sizes import parse_size
from undercloud_backup.store import swift
from undercloud_backup.store.connection import SwiftStore


class SwiftTarget(Block):
    """OpenStack Swift behind Keystone v3, with a password or an application credential."""

    _block_type_name = "Swift Backup Target"
    _block_type_slug = "swift-backup-target"
    _description = "Keystone v3 credentials and the Swift container undercloud backups go to."

    auth_url: str = Field(..., description="Keystone v3 URL, e.g. https://keystone:5000/v3.")
    username: str | None = Field(None, description="Keystone user (password authentication).")
    password: SecretStr | None = Field(None, description="Password of that user.")
    user_domain_name: str = Field("Default", description="Domain of the user.")
    project_name: str | None = Field(None, description="Project that owns the container.")
    project_domain_name: str = Field("Default", description="Domain of the project.")
    application_credential_id: str | None = Field(
        None, description="Application credential ID (instead of user and password).")
    application_credential_secret: SecretStr | None = Field(
        None, description="Application credential secret.")
    region_name: str | None = Field(None, description="Region of the object-store endpoint.")
    interface: str = Field("public", description="Endpoint interface: public, internal, admin.")
    storage_url: str | None = Field(
        None, description="Swift storage URL, to bypass the Keystone catalog (rarely needed).")
    container: str = Field("undercloud-backups", description="Container for the backups; "
                                                             "segments go to <container>_segments.")
    segment_size: str | None = Field(
        None, description="Objects larger than this are uploaded as Static Large Objects of "
                          "segments this big (empty: chosen per stream, 64MiB or more so that "
                          "no object needs over 900 segments).")
    retries: int = Field(defaults.SWIFT_RETRIES,
                         description="Retries of one failed Swift request (5xx, 408, 429, "
                                     "lost connection), with back-off or Retry-After.")
    timeout: float = Field(defaults.SWIFT_TIMEOUT_S,
                           description="Seconds one Swift request may wait for an answer "
                                       "before it is retried.")
    retry_budget_s: float = Field(defaults.SWIFT_RETRY_BUDGET_S,
                                  description="Seconds within which a failed Swift request is "
                                              "retried; a dead Swift fails after this plus the "
                                              "timeout.")

    def settings(self) -> swift.SwiftSettings:
        """Plain settings for the uploader; secrets are only read here."""
        return swift.SwiftSettings(
            auth_url=self.auth_url, username=self.username,
            password=self.password.get_secret_value() if self.password else None,
            user_domain_name=self.user_domain_name, project_name=self.project_name,
            project_domain_name=self.project_domain_name,
            application_credential_id=self.application_credential_id,
            application_credential_secret=(self.application_credential_secret.get_secret_value()
                                           if self.application_credential_secret else None),
            region_name=self.region_name, interface=self.interface,
            storage_url=self.storage_url, container=self.container,
            segment_size=parse_size(self.segment_size) if self.segment_size else None,
            retries=self.retries, timeout=self.timeout, retry_budget_s=self.retry_budget_s)

    def get_store(self) -> SwiftStore:
        """An authenticated store (one connection, one retry policy)."""
        return SwiftStore.connect(self.settings())
