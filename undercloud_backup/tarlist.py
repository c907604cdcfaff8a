"""Reading an archive's member names as ``tar --list`` prints them (verify and restore)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import IO

from undercloud_backup.execute import Command

_ESCAPE = re.compile(rb"\\([0-7]{3}|[\\abfnrtv?])")
_SIMPLE = {b"\\": b"\\", b"a": b"\a", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r",
           b"t": b"\t", b"v": b"\v", b"?": b"?"}


def unescape_member(raw: bytes) -> str:
    """A member name as ``tar --quoting-style=escape`` prints it, back to the real name."""
    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        return bytes([int(code, 8)]) if len(code) == 3 else _SIMPLE[code]

    return os.fsdecode(_ESCAPE.sub(one, raw))


def tar_list_command() -> Command:
    return Command(argv=("tar", "--list", "--file=-", "--quoting-style=escape", "--xattrs",
                         "--xattrs-include=*", "--acls", "--selinux"), name="tar --list")


def read_members(stream: IO[bytes], on_member: Callable[[str], None]) -> None:
    """Feed every member name tar prints (one per line, directories end in ``/``)."""
    for raw in iter(stream.readline, b""):
        on_member(unescape_member(raw.rstrip(b"\n")))
