"""undercloud-backup: verifiable backups of an OpenStack undercloud into Swift."""

__version__ = "0.1.0"
