"""Run a command where nothing but one directory can be written: ``confine_helper.py TARGET --
COMMAND...``, inside a fresh private mount namespace (``unshare --mount --propagation private``).

Standard library only: it runs as ``python -I -S`` by its path, before any package is on
``sys.path``. In the namespace it binds TARGET onto itself, makes every mount read-only and
``nodev`` (recursively, ``mount_setattr(2)``), makes the target's own bind writable again,
covers every ``/proc`` with an empty read-only tmpfs (``/proc/PID/root`` and ``/proc/PID/cwd``
lead into the original namespace, whose mounts are still writable), checks all of that, then
execs COMMAND. A symlink, ``..``, hard link or device node that leads out of the target then
fails (EROFS, EXDEV, EACCES) instead of writing. Any failure to set up exits with status
:data:`SETUP_FAILED` and a line beginning ``confine:`` on stderr; COMMAND never runs.
"""

from __future__ import annotations

import ctypes
import os
import sys

SETUP_FAILED = 125
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (unified syscall table)
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_AT_SYMLINK_NOFOLLOW = 0x100
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_BIND, _MS_REC = 0x1000, 0x4000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _setattr(path: str, set_: int, clear: int, flags: int) -> None:
    attr = _MountAttr(set_, clear, 0, 0)
    _check(_libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD),
                         os.fsencode(path), ctypes.c_uint(flags | _AT_SYMLINK_NOFOLLOW),
                         ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           f"mount_setattr {path}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: bytes | None = None) -> None:
    _check(_libc.mount(os.fsencode(source) if source else None, os.fsencode(target),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags), data),
           f"mount {target}")


def _proc_mounts() -> list[str]:
    """Mount points of every procfs, from /proc/self/mountinfo (octal escapes undone)."""
    points = []
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            fields, _, rest = line.partition(b" - ")
            if rest.split()[:1] == [b"proc"]:
                raw = fields.split()[4]
                points.append(os.fsdecode(raw.replace(b"\\040", b" ").replace(
                    b"\\011", b"\t").replace(b"\\012", b"\n").replace(b"\\134", b"\\")))
    return sorted(points, key=len)


def confine(target: str) -> None:
    """Everything but ``target`` read-only, no device opens, no way back through /proc."""
    if not os.path.isabs(target) or os.path.realpath(target) != target:
        raise OSError(0, f"{target} is not an absolute real path")
    procs = _proc_mounts()
    _mount(target, target, None, _MS_BIND | _MS_REC)
    _setattr("/", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NODEV | _MOUNT_ATTR_NOSUID, 0, _AT_RECURSIVE)
    _setattr(target, 0, _MOUNT_ATTR_RDONLY, 0)  # its own bind only: mounts below stay read-only
    covered: list[str] = []
    for point in procs:  # /proc/PID/root leads into the original, writable, mounts
        if not any(point == c or point.startswith(c.rstrip("/") + "/") for c in covered):
            _mount("none", point, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                   b"size=0,mode=0555")
            covered.append(point)
    _verify(target)


def _verify(target: str) -> None:
    """What the command will rely on, checked rather than assumed."""
    if not os.statvfs("/").f_flag & os.ST_RDONLY:
        raise OSError(0, "/ is still writable")
    if os.statvfs(target).f_flag & os.ST_RDONLY:
        raise OSError(0, f"{target} is not writable")
    if os.path.lexists("/proc/self"):
        raise OSError(0, "/proc is still reachable")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("confine: usage: confine_helper.py TARGET -- COMMAND...", file=sys.stderr)
        return SETUP_FAILED
    try:
        confine(argv[0])
    except OSError as error:
        print(f"confine: cannot confine to {argv[0]}: {error.strerror or error}",
              file=sys.stderr)
        return SETUP_FAILED
    try:
        os.execvp(argv[2], argv[2:])
    except OSError as error:
        print(f"confine: cannot run {argv[2]}: {error.strerror}", file=sys.stderr)
    return SETUP_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
