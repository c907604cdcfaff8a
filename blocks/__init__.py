"""Prefect blocks: saved connection settings and credentials, editable in the UI."""

from blocks.mariadb import MariaDBConnection
from blocks.swift import SwiftTarget

__all__ = ["MariaDBConnection", "SwiftTarget"]
