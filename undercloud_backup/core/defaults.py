"""The defaults a run falls back on, in one place: the flows' parameters, their CLI flags and the
library's value types all take them from here, so a default changes in one line."""

from __future__ import annotations

# Spool of segments on their way to or from Swift, and the default restore target's parent:
# on disk, not tmpfs, and kept across reboots for a restore that is looked at afterwards.
STAGING_DIR = "/var/tmp"

# Retention: the N most recent complete backups, the newest of each of the last D days and
# of the last W ISO weeks; an incomplete backup is removed once untouched this long.
KEEP_LAST = 3
KEEP_DAILY = 7
KEEP_WEEKLY = 4
GRACE_HOURS = 24.0

# Longest the files or the databases of a restore, or one check of a verification, may take.
RESTORE_TIMEOUT_HOURS = 12.0
VERIFY_TIMEOUT_HOURS = 6.0

# Retries of a stage or a check after a transient failure (Swift or the database down).
TASK_RETRIES = 2

# How long Swift may take (store.RetryPolicy): a failed request is tried again up to
# SWIFT_RETRIES times while SWIFT_RETRY_BUDGET_S lasts; each attempt waits at most
# SWIFT_TIMEOUT_S for a byte.
SWIFT_RETRIES = 5
SWIFT_TIMEOUT_S = 60.0
SWIFT_RETRY_BUDGET_S = 120.0

# zstd level of both streams, the dump and the archive (zstd's own default).
COMPRESSION_LEVEL = 3

# Hours the download links (Swift TempURLs) in a backup's artifact work.
LINK_LIFETIME_HOURS = 24

# Files: an incremental while the chain's full is younger than this, then a full.
FULL_EVERY_DAYS = 7
FULL_EVERY = f"{FULL_EVERY_DAYS}d"
