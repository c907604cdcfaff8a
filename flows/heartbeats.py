"""Flow-run heartbeats that stop when the run ends.

Prefect 3.9.1's heartbeat thread (``prefect.flow_engine._send_heartbeats``) sleeps in one-second
steps, and the engine joins it when a flow run ends. Every run, ad hoc or deployed, waited up
to a second after its last task, half a second on average (benchmarks/RESULTS.md, "Heartbeats").
This sends the same beats from a thread that waits on the stop event, so the join returns at
once. :func:`install` puts it in place when the ``flows`` package is imported (the deployments'
entrypoints and the CLI alike), and only over the Prefect version it was written against: any
other keeps Prefect's own.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

WRITTEN_FOR = "3.9.1"


@contextmanager
def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    """Beat every ``engine.heartbeat_seconds`` (none when unset) until the block ends."""
    from prefect import flow_engine

    every = engine.heartbeat_seconds
    if every is None:
        yield
        return
    every = max(every, flow_engine.MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            run = engine.flow_run
            if run is not None and run.state is not None and run.state.is_final():
                return  # a beat after the end would make the zombie automation wait for more
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:  # noqa: BLE001 - a lost beat is the automation's to judge
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            stop.wait(every)

    # In the caller's context, so that its settings (PREFECT_API_URL) hold in the thread.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,),
                              name="flow-run-heartbeats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=2)


def install() -> bool:
    """Use :func:`send_heartbeats` for flow runs in this process; False where Prefect is not
    the version it was written against (its own stays)."""
    import prefect
    from prefect import flow_engine

    if prefect.__version__ != WRITTEN_FOR or not hasattr(flow_engine, "_send_heartbeats"):
        return False
    flow_engine._send_heartbeats = send_heartbeats
    return True
