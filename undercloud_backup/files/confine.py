"""Keeping a restore inside its target, and its target out of other users' reach.

An archive (or the levels of a chain, one after the other) can hold a symlink that leads out of
the target and, later, members under it; tar's own protections hold within one archive only.
So every ``tar -x`` into a target other than ``/`` runs confined (:func:`confined`): in a
private mount namespace where everything but the target is read-only and ``nodev``, ``/proc``
is covered, and tar holds no ``CAP_MKNOD`` (:mod:`undercloud_backup.files.confine_helper`). Whatever
the archives hold, a write, deletion, chmod, chown, xattr, hard link or device node that does
not resolve inside the target fails instead of happening. Not root: the same in a user
namespace (``unshare --user --map-root-user``), which this kernel allows unprivileged. Into
``/`` the chain's listings are checked before anything is written
(:func:`undercloud_backup.files.tarlist.leading_out`).

Targets (:func:`secure_directory`): root creates its own, exclusively, and never through a
name another user can change: every directory on the way must be one only root (or we) can
change, a symlink on the way is followed only if such a directory holds it and root owns it,
and the target must be a directory of ours that nobody else can write into. The default
target has a random suffix (:func:`new_default_target`), so nobody can plant it in advance.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

from undercloud_backup.core.errors import BackupError, CommandFailed
from undercloud_backup.core.execute import Command, run
from undercloud_backup.files import confine_helper

HELPER = str(Path(confine_helper.__file__).resolve())
PROBE_TIMEOUT_S = 60.0
_MAX_LINKS = 40
# Never CAP_MKNOD: no device node is made (an overlay whiteout, 0:0, needs none).
DROP_MKNOD = ("setpriv", "--inh-caps=-mknod", "--bounding-set=-mknod", "--")


class ConfinementUnavailable(BackupError):
    """Cannot confine the extraction to {target}: {reason}. Nothing was extracted; the restore needs unshare(1) and setpriv(1) (util-linux) and mount namespaces (as root, or unprivileged user namespaces)."""  # noqa: E501

    exit_code = 62


class OutsideRefused(BackupError):
    """The archive {name} tried to write outside {target}: {example}. The confinement refused it and nothing outside {target} was changed; this backup (or chain) is forged or broken: restore an earlier one. What was extracted so far is under {target}."""  # noqa: E501

    exit_code = 63


class TargetUnsafe(BackupError):
    """Refusing {what} {path}: {reason}. Choose a directory only root can change (or let the restore make its own under a root-owned --staging-dir)."""  # noqa: E501

    exit_code = 65


def _ours(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _shared(st: os.stat_result) -> bool:
    """Others can add, rename or remove its entries."""
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _entry_is_safe(parent: os.stat_result, entry: os.stat_result) -> bool:
    """Only root (or we) can replace this entry of ``parent``."""
    if not _ours(parent.st_uid):
        return False
    return not _shared(parent) or bool(parent.st_mode & stat.S_ISVTX) and _ours(entry.st_uid)


def secure_directory(path: str, *, what: str = "restore target", create: bool = False,
                     mode: int = 0o755, sticky_ok: bool = False) -> str:
    """The real path of directory ``path``, reached only through names only root (or we) can
    change; ``create``: missing components are made (``mkdir``, which never follows a link).
    Missing without ``create``: the path as it will be, once its existing part is checked.
    The directory itself must be ours and not writable by others (``/`` excepted;
    ``sticky_ok``: a shared sticky one too, such as ``/var/tmp``, to make our own in)."""
    if not os.path.isabs(path) or ".." in path.split("/"):
        raise TargetUnsafe(what=what, path=path, reason="it must be an absolute path without ..")
    parts, current = [p for p in path.split("/") if p not in ("", ".")], "/"
    followed = 0
    while parts:
        name = parts.pop(0)
        here = os.lstat(current)
        candidate = os.path.join(current, name)
        try:
            entry = os.lstat(candidate)
        except FileNotFoundError:
            if not create:
                return os.path.join(candidate, *parts)
            _make(candidate, here, mode, what)
            entry = os.lstat(candidate)
        if not _entry_is_safe(here, entry):
            raise TargetUnsafe(what=what, path=path, reason=f"{candidate} can be replaced by "
                               f"another user ({current} is writable by others or not root's)")
        if stat.S_ISLNK(entry.st_mode):
            followed += 1
            if followed > _MAX_LINKS:
                raise TargetUnsafe(what=what, path=path, reason="too many symbolic links")
            link = os.readlink(candidate)
            rest = [p for p in link.split("/") if p not in ("", ".")]
            if ".." in rest:
                raise TargetUnsafe(what=what, path=path,
                                   reason=f"{candidate} is a symbolic link with ..")
            current = "/" if link.startswith("/") else current
            parts = rest + parts
            continue
        if not stat.S_ISDIR(entry.st_mode):
            raise TargetUnsafe(what=what, path=path, reason=f"{candidate} is not a directory")
        current = candidate
    _check_final(path, current, what, sticky_ok)
    return current


def _make(candidate: str, parent: os.stat_result, mode: int, what: str) -> None:
    if not _ours(parent.st_uid):
        raise TargetUnsafe(what=what, path=candidate,
                           reason="its parent directory belongs to another user")
    try:
        os.mkdir(candidate, mode)  # exclusive: fails on anything there, a planted link too
    except FileExistsError:
        return  # raced: the caller looks at what is there now
    fd = os.open(candidate, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)  # whatever the umask
    finally:
        os.close(fd)


def _check_final(path: str, real: str, what: str, sticky_ok: bool) -> None:
    if real == "/":
        return
    st = os.lstat(real)
    if not _ours(st.st_uid):
        raise TargetUnsafe(what=what, path=path, reason=f"{real} belongs to uid {st.st_uid}")
    if _shared(st) and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        raise TargetUnsafe(what=what, path=path, reason=f"{real} is writable by other users, "
                           "who could plant links in it")


def secure_staging(staging_dir: str, *, create: bool = False) -> str:
    """The real path of ``staging_dir``, where root makes its scratch directories (each under
    a random name, exclusively): reached only through names no other user can change, and
    ours; a shared sticky one such as ``/var/tmp`` too (nobody else can rename or remove what
    we make in it). A planted link, or another user's directory, is :class:`TargetUnsafe`."""
    return secure_directory(staging_dir, what="staging directory", create=create,
                            mode=0o755, sticky_ok=True)


def new_default_target(staging_dir: str, backup_id: str) -> str:
    """A new directory ``undercloud-restore-<backup_id>-<random>`` in ``staging_dir``, made
    exclusively with mode 0700: nobody can know its name, or plant it, in advance."""
    staging = secure_staging(staging_dir)
    if not os.path.isdir(staging):
        raise TargetUnsafe(what="staging directory", path=staging_dir,
                           reason="it does not exist")
    return tempfile.mkdtemp(prefix=f"undercloud-restore-{backup_id}-", dir=staging)


def default_target_pattern(staging_dir: str, backup_id: str) -> str:
    """What a dry run shows for the default target, which it does not create."""
    return os.path.join(staging_dir, f"undercloud-restore-{backup_id}-XXXXXXXX")


def confined(command: Command, target: str) -> Command:
    """``command`` (a ``tar -x``) unable to change anything that is not under ``target``
    (for ``/``: unable to make device nodes; the chain's listings are checked before)."""
    argv = (*DROP_MKNOD, *command.argv)
    if target != "/":
        if os.geteuid() == 0:
            namespace: tuple[str, ...] = ("unshare", "--mount", "--propagation", "private")
        else:
            namespace = ("unshare", "--user", "--map-root-user", "--mount", "--propagation",
                         "private")
        argv = (*namespace, "--", sys.executable, "-I", "-S", HELPER, target, "--", *argv)
    return Command(argv=argv, name=command.name)


def probe(target: str) -> None:
    """Set the confinement up once with ``true`` as the command: fail closed, before anything
    is read or extracted, where it cannot be."""
    try:
        run(confined(Command(argv=("true",), name="confinement check"), target),
            timeout=PROBE_TIMEOUT_S)
    except CommandFailed as error:
        raise ConfinementUnavailable(target=target, reason=error.fields["stderr"]) from None
    except FileNotFoundError as error:
        raise ConfinementUnavailable(target=target, reason=str(error)) from None


def setup_failure(stderr_lines: list[str]) -> str | None:
    """The confinement's own complaint in a confined command's stderr, if it failed to start."""
    for line in stderr_lines:
        if line.startswith(("confine:", "unshare:", "setpriv:")):
            return line
    return None


ESCAPE_SIGNS = ("Read-only file system", "Invalid cross-device link",
                "Cannot mknod: Operation not permitted")


def escape_attempt(stderr_lines: list[str]) -> str | None:
    """tar's first complaint that only an attempt to leave the target explains."""
    return next((line for line in stderr_lines if any(s in line for s in ESCAPE_SIGNS)), None)
