"""installfs: the file operations deployments/install.sh does as root, never through a path that
anyone but root can change.

    installfs.py check PATH                       PATH and every directory above it are root's
    installfs.py dir PATH OWNER GROUP MODE        a real directory (made if absent), chown, chmod
    installfs.py file PATH OWNER GROUP MODE [--keep]
                                                  stdin written atomically (temp + rename);
                                                  --keep: an existing PATH is left as it is
    installfs.py render TEMPLATE PATH OWNER GROUP MODE
                                                  as `file --keep`, TEMPLATE with @KEY@ replaced by
                                                  the environment variable UCB_SUBST_KEY (secrets
                                                  travel in the environment, never on an argv)
    installfs.py touch PATH OWNER GROUP MODE      a regular file (made empty if absent), chown/chmod

Every directory from / to the parent of PATH must be a real directory (no symlink) owned by root;
directories above the parent may be writable by others only if sticky (/var/tmp); the parent
itself must be writable by root alone, so no other user can plant or swap the name root acts on.
The walk holds a file descriptor per directory (openat with O_NOFOLLOW), and the final object is
opened with O_NOFOLLOW and changed through its descriptor (fchown, fchmod): a symlink anywhere is
refused, never followed. Runs as `python3 -I -S`: standard library only.

Exit status: 0, 1 = refused (one line on stderr), 64 = usage.
"""

import grp
import os
import pwd
import stat
import sys

NAME = "install"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(Exception):
    pass


def open_parent(path: str) -> tuple[int, str]:
    """A descriptor of PATH's parent, reached without following any symlink; and the last name."""
    if not path.startswith("/") or path.rstrip("/") == "" or "/../" in path + "/":
        raise Refused(f"{path}: expected an absolute, normalized path")
    parts = [part for part in path.split("/") if part]
    fd = os.open("/", DIR_FLAGS)
    where = ""
    try:
        if len(parts) == 1:
            check_dir(fd, "/", parent=True)
        for index, part in enumerate(parts[:-1]):
            try:
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as error:
                raise Refused(f"{where}/{part} {why(error, fd, part)} (on the way to {path})") \
                    from None
            os.close(fd)
            fd = nxt
            where += "/" + part
            check_dir(fd, where, parent=index == len(parts) - 2)
    except Refused:
        os.close(fd)
        raise
    return fd, parts[-1]


def why(error: OSError, parent: int, name: str) -> str:
    try:
        if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            return "is a symbolic link; refusing to follow it (remove it if you did not make it)"
    except OSError:
        pass
    return f": {error.strerror}"


def check_dir(fd: int, where: str, parent: bool) -> None:
    st = os.fstat(fd)
    if st.st_uid != 0:
        raise Refused(f"{where} is owned by uid {st.st_uid}, not root: root writes nothing "
                      "below a directory another user can change")
    writable = st.st_mode & 0o022
    if writable and (parent or not st.st_mode & stat.S_ISVTX):
        raise Refused(f"{where} is writable by group or others (mode "
                      f"{stat.S_IMODE(st.st_mode):o}): root writes nothing there")


def ids(owner: str, group: str) -> tuple[int, int]:
    try:
        return pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError as error:
        raise Refused(f"no such user or group: {error.args[0]}") from None


def open_leaf(parent: int, name: str, path: str, flags: int) -> int:
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
    except OSError as error:
        raise Refused(f"{path} {why(error, parent, name)}") from None


def settle(fd: int, path: str, kind: int, owner: str, group: str, mode: str) -> None:
    st = os.fstat(fd)
    if stat.S_IFMT(st.st_mode) != kind:
        what = "directory" if kind == stat.S_IFDIR else "regular file"
        raise Refused(f"{path} exists and is not a {what}")
    if kind == stat.S_IFREG and st.st_nlink > 1:
        raise Refused(f"{path} has {st.st_nlink} hard links; refusing to change it")
    uid, gid = ids(owner, group)
    os.fchown(fd, uid, gid)
    os.fchmod(fd, int(mode, 8))


def make_dir(path: str, owner: str, group: str, mode: str) -> None:
    parent, name = open_parent(path)
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass
        fd = open_leaf(parent, name, path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            settle(fd, path, stat.S_IFDIR, owner, group, mode)
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def exists(parent: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def write_file(path: str, owner: str, group: str, mode: str, data: bytes, keep: bool) -> bool:
    parent, name = open_parent(path)
    try:
        if keep and exists(parent, name):
            return False
        temp = f".{name}.new.{os.getpid()}"
        fd = open_leaf(parent, temp, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            settle(fd, path, stat.S_IFREG, owner, group, mode)
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.unlink(temp, dir_fd=parent)
            raise
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
        return True
    finally:
        os.close(parent)


def touch(path: str, owner: str, group: str, mode: str) -> None:
    parent, name = open_parent(path)
    try:
        fd = open_leaf(parent, name, path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            settle(fd, path, stat.S_IFREG, owner, group, mode)
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def check(path: str) -> None:
    parent, name = open_parent(path)
    try:
        fd = open_leaf(parent, name, path, os.O_RDONLY)
        try:
            check_dir(fd, path, parent=True)
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def render(template: str) -> bytes:
    with open(template, encoding="utf-8") as source:
        text = source.read()
    for key, value in os.environ.items():
        if key.startswith("UCB_SUBST_"):
            text = text.replace(f"@{key[len('UCB_SUBST_'):]}@", value)
    return text.encode()


def main(argv: list[str]) -> str:
    usage = Refused("usage: installfs.py check|dir|file|render|touch ...")
    if not argv:
        raise usage
    action, args = argv[0], argv[1:]
    if action == "check" and len(args) == 1:
        check(args[0])
        return ""
    if action == "dir" and len(args) == 4:
        make_dir(*args)
        return ""
    if action == "touch" and len(args) == 4:
        touch(*args)
        return ""
    if action == "file" and len(args) in (4, 5) and args[4:] in ([], ["--keep"]):
        written = write_file(*args[:4], sys.stdin.buffer.read(), keep=bool(args[4:]))
        return "written" if written else "kept"
    if action == "render" and len(args) == 5:
        written = write_file(*args[1:], render(args[0]), keep=True)
        return "written" if written else "kept"
    raise usage


if __name__ == "__main__":
    try:
        result = main(sys.argv[1:])
    except Refused as error:
        print(f"[{NAME}] ERROR: {error}", file=sys.stderr)
        sys.exit(1)
    if result:
        print(result)
