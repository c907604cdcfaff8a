"""Prefect flows of undercloud-backup."""
