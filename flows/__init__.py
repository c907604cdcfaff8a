"""Prefect flows of undercloud-backup."""

from flows import heartbeats

# Before any flow runs: its end no longer waits for the heartbeat thread's sleep (heartbeats.py).
heartbeats.install()
