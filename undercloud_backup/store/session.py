"""The run's Swift session: one Keystone login and one check per container for all its stages.

A flow opens it around its stages (:func:`shared`); a stage asks for a store with
:func:`open_store`, which is a store on the run's session when one is open for the same
credentials in this process (tasks run in threads of the flow's process, ad hoc and deployed
runs alike), or a store with a login of its own otherwise (a task called on its own, a test).
Either way the store is closed when the ``with`` ends; the session when the run's ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from undercloud_backup.store.connection import SessionKey, SwiftSession, SwiftStore, session_key
from undercloud_backup.store.swift import SwiftSettings

_lock = threading.Lock()
# Sessions open in this process, by credentials, with how many runs hold each.
_sessions: dict[SessionKey, tuple[SwiftSession, int]] = {}


@contextmanager
def shared(settings: SwiftSettings) -> Iterator[SwiftSession]:
    """Open (or join) the session for ``settings``' credentials for as long as the ``with``
    lasts; the last one out closes it. It logs in when a stage first uses it."""
    key = session_key(settings)
    with _lock:
        session, holders = _sessions.get(key, (None, 0))
        if session is None:
            session = SwiftSession(settings)
        _sessions[key] = (session, holders + 1)
    try:
        yield session
    finally:
        with _lock:
            _, holders = _sessions[key]
            if holders > 1:
                _sessions[key] = (session, holders - 1)
            else:
                del _sessions[key]
                session.close()


def registered() -> int:
    """How many sessions are open (what a finished run must have left: none of its own)."""
    with _lock:
        return len(_sessions)


@contextmanager
def open_store(settings: SwiftSettings) -> Iterator[SwiftStore]:
    """A store on the shared session for these credentials, or on a session of its own;
    closed (with its own session) when the ``with`` ends."""
    with _lock:
        session, _ = _sessions.get(session_key(settings), (None, 0))
    store = session.store(settings) if session is not None else SwiftStore.connect(settings)
    with store:
        yield store
