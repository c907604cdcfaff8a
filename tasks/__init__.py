"""Prefect tasks of undercloud-backup."""
