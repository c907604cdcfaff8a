"""The OpenStackClient plugin module (entry point group ``openstack.cli.extension``).

``openstack`` imports every plugin module on every command it runs, so this one imports
nothing of the project: the commands (:mod:`undercloud_backup_osc.commands`) import the flows
only when one of them runs.
"""

from __future__ import annotations

import argparse
import os

API_NAME = "undercloud_backup"
API_VERSION_OPTION = "os_undercloud_backup_api_version"
DEFAULT_API_VERSION = "1"
API_VERSIONS = ("1",)  # its commands: entry point group openstack.undercloud_backup.v1


def make_client(instance: object) -> object:
    """``client_manager.undercloud_backup``: the client manager itself. The commands take the
    Keystone session it set up (:mod:`undercloud_backup_osc.auth`); no client of their own."""
    return instance


def build_option_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--os-undercloud-backup-api-version", metavar="<version>",
        default=os.environ.get("OS_UNDERCLOUD_BACKUP_API_VERSION", DEFAULT_API_VERSION),
        help="undercloud-backup command set version (only 1; env "
             "OS_UNDERCLOUD_BACKUP_API_VERSION)")
    return parser
