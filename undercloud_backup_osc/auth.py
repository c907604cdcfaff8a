"""The ``openstack`` client's login as the Swift target of a run.

OSC has already read ``OS_*``, ``--os-cloud`` and its clouds.yaml, chosen an auth plugin and
logged in (``auth_required``); the run's Swift session reuses that keystoneauth session, so
the token is not asked for twice and no secret is copied anywhere: not into our settings, an
environment, an argument or a log line. Only names (auth URL, user, region, interface) are
read, for the run's messages.
"""

from __future__ import annotations

from typing import Any

from undercloud_backup.store.swift import SwiftSettings


def swift_settings(client_manager: Any) -> SwiftSettings:
    """Swift settings on the client manager's session (its auth plugin renews the token)."""
    client_manager.setup_auth()  # done already for a command that requires auth; idempotent
    session = client_manager.session
    if session.timeout is None:  # the client's default: a stalled Keystone would hang a run
        session.timeout = SwiftSettings.timeout
    config = client_manager.get_configuration()
    auth = config.get("auth") or {}
    return SwiftSettings(
        auth_url=str(auth.get("auth_url") or getattr(client_manager.auth, "auth_url", "")
                     or "the openstack client's Keystone"),
        username=auth.get("username") or auth.get("user_id"),
        application_credential_id=auth.get("application_credential_id"),
        project_name=auth.get("project_name"),
        region_name=client_manager.region_name or None,
        interface=client_manager.interface or "public",
        storage_url=config.get("object_store_endpoint_override") or None,
        keystone_session=session)
