"""Time-limited download links (Swift TempURLs) for the objects of a backup.

A TempURL is the object's URL plus ``temp_url_sig`` (an HMAC of ``GET``, the expiry time and
the object's path under the account's temp-url key) and ``temp_url_expires``; Swift's
``tempurl`` middleware lets anyone holding it GET the object until then, without a token. A
GET of a Static Large Object's manifest returns the reassembled object, so one link downloads
a whole segmented dump or archive with ``curl -o``.

The key: the tool signs with the account key it set itself (recorded, by slot only, in
``X-Account-Meta-Undercloud-Backup-Temp-Url-Slot``); where it has none it takes a free slot
(``Temp-URL-Key``, else ``Temp-URL-Key-2``) with a new random key. A key someone else set is
never overwritten: with both slots taken, their first key signs the links. Setting a key needs
the account owner's role (``member``/``admin`` under keystoneauth). The key is never logged,
returned or put in an artifact: only the signed links leave this module.

Links are made for encrypted backups only: a link downloads without credentials, so for a
backup stored in plain text it would hand the undercloud's secrets to whoever sees the
artifact. Such a backup's artifact says how to download it with the Swift credentials instead.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Protocol

from swiftclient.utils import generate_temp_url

from undercloud_backup.core import defaults
from undercloud_backup.core.errors import ConfigError, SwiftRequestFailed
from undercloud_backup.core.manifest import Manifest
from undercloud_backup.store.connection import info_url
from undercloud_backup.trust import crypto

DEFAULT_LIFETIME = defaults.LINK_LIFETIME_HOURS * 3600
MAX_LIFETIME = 366 * 24 * 3600
# Strongest first; sha1 is deprecated in Swift and only used when nothing else is allowed.
DIGESTS = ("sha256", "sha512", "sha1")
KEY_HEADERS = ("x-account-meta-temp-url-key", "x-account-meta-temp-url-key-2")
SLOT_HEADER = "x-account-meta-undercloud-backup-temp-url-slot"


class TempURLUnavailable(ConfigError):
    """Swift cannot give download links: {detail}"""


class PlainTextNoLinks(TempURLUnavailable):
    """Swift cannot give download links: backup {backup_id} is stored in plain text, and a link would hand it to anyone who holds the link; download it with the Swift credentials."""  # noqa: E501


class Account(Protocol):
    """What this module needs of a Swift connection (store.SwiftStore has it)."""

    url: str

    def account(self) -> dict[str, str]: ...

    def post_account(self, headers: dict[str, str]) -> None: ...


@dataclass(frozen=True)
class DownloadLink:
    """A signed GET link to one object, valid until ``expires`` (Unix time)."""

    leaf: str
    size: int
    sha256: str
    url: str
    expires: int

    def to_dict(self) -> dict:
        return {"object": self.leaf, "bytes": self.size, "sha256": self.sha256,
                "url": self.url, "expires": self.expires}


def choose_digest(capabilities: dict) -> str:
    """The strongest digest this Swift's tempurl middleware accepts, or why there is none."""
    tempurl = capabilities.get("tempurl")
    if tempurl is None:
        raise TempURLUnavailable(detail="the tempurl middleware is not in this Swift's proxy "
                                        "pipeline (ask its operator to add it)")
    if "GET" not in tempurl.get("methods", ["GET"]):
        raise TempURLUnavailable(detail="this Swift's tempurl middleware does not allow GET")
    allowed = tempurl.get("allowed_digests", ["sha1", "sha256", "sha512"])
    for digest in DIGESTS:
        if digest in allowed:
            return digest
    raise TempURLUnavailable(detail=f"no digest this tool knows is allowed ({allowed})")


def swift_capabilities(storage_url: str, timeout: float = 30) -> dict:
    url = info_url(storage_url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as error:
        raise TempURLUnavailable(detail=f"cannot read {url}: {error}") from None


@dataclass(frozen=True)
class KeyPlan:
    """Which key signs, and the headers to POST first (empty: the key is already set)."""

    key: str
    set_headers: dict[str, str]


def plan_key(account_headers: dict[str, str], new_key: str) -> KeyPlan:
    """Pure: which slot to use given the account's headers (lower-case names)."""
    headers = {k.lower(): v for k, v in account_headers.items()}
    ours = headers.get(SLOT_HEADER, "")
    slot = {"1": KEY_HEADERS[0], "2": KEY_HEADERS[1]}.get(ours)
    if slot and headers.get(slot):
        return KeyPlan(key=headers[slot], set_headers={})
    for number, header in (("1", KEY_HEADERS[0]), ("2", KEY_HEADERS[1])):
        if not headers.get(header):
            return KeyPlan(key=new_key, set_headers={header: new_key, SLOT_HEADER: number})
    return KeyPlan(key=headers[KEY_HEADERS[0]], set_headers={})


def account_key(account: Account) -> str:
    """The key to sign with, setting one in a free slot when the account has none of ours."""
    plan = plan_key(account.account(), secrets.token_urlsafe(32))
    if plan.set_headers:
        try:
            account.post_account(plan.set_headers)
        except SwiftRequestFailed as error:
            raise TempURLUnavailable(
                detail=f"the account has no temp-url key of ours and setting one failed "
                       f"({error.fields.get('reason')}); the Swift user needs the account "
                       "owner's role, or an operator sets X-Account-Meta-Temp-URL-Key") from None
    return plan.key


def sign(storage_url: str, container: str, name: str, key: str, expires: int, digest: str,
         filename: str | None = None) -> str:
    """Pure: the signed URL of ``container/name`` valid until ``expires`` (Unix time)."""
    base = urllib.parse.urlsplit(storage_url)
    path = f"{base.path.rstrip('/')}/{container}/{name}"  # signed unquoted, as Swift sees it
    signed = generate_temp_url(path, expires, key, "GET", absolute=True, digest=digest)
    query = urllib.parse.urlsplit(signed).query
    if filename:
        # not part of the signature: names the download (curl -OJ, browsers)
        query += "&" + urllib.parse.urlencode({"filename": filename})
    return urllib.parse.urlunsplit((base.scheme, base.netloc, urllib.parse.quote(path), query,
                                    ""))


def check_lifetime(seconds: int) -> int:
    if not isinstance(seconds, int) or not 0 < seconds <= MAX_LIFETIME:
        raise ConfigError(detail=f"download link lifetime must be 1 s to {MAX_LIFETIME // 86400}"
                                 f" days, not {seconds!r}")
    return seconds


def download_links(account: Account, container: str, manifest: Manifest,
                   lifetime: int = DEFAULT_LIFETIME, now: float | None = None,
                   ) -> list[DownloadLink]:
    """One signed link per object of ``manifest`` (the manifest itself last); an encrypted
    backup's only (PlainTextNoLinks otherwise)."""
    if not crypto.is_encrypted(manifest):
        raise PlainTextNoLinks(backup_id=manifest.backup_id)
    check_lifetime(lifetime)
    storage_url = account.url
    digest = choose_digest(swift_capabilities(storage_url))
    key = account_key(account)
    expires = int(now if now is not None else time.time()) + lifetime
    links = []
    for obj in manifest.objects:
        links.append(DownloadLink(
            leaf=obj.leaf, size=obj.size, sha256=obj.sha256, expires=expires,
            url=sign(storage_url, container, obj.name, key, expires, digest,
                     filename=f"{manifest.backup_id}-{obj.leaf}")))
    name = f"{manifest.backup_id}/manifest.json"
    links.append(DownloadLink(leaf="manifest.json", size=0, sha256="", expires=expires,
                              url=sign(storage_url, container, name, key, expires, digest,
                                       filename=f"{manifest.backup_id}-manifest.json")))
    return links


def links_markdown(links: list[DownloadLink]) -> str:
    """The artifact's section: one line per object, and how to fetch it."""
    if not links:
        return ""
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(links[0].expires))
    lines = [f"### Download (links valid until {until})", "",
             "| object | bytes | sha256 |", "|---|---:|---|"]
    for link in links:
        sha = f"`{link.sha256[:16]}…`" if link.sha256 else ""
        size = str(link.size) if link.size else ""
        lines.append(f"| [{link.leaf}]({link.url}) | {size} | {sha} |")
    lines += ["", "Each link downloads the whole object (Swift joins the segments): "
              "`curl -fo FILE 'LINK'`, then compare `sha256sum FILE`."]
    return "\n".join(lines)


def plain_text_markdown(container: str, backup_id: str) -> str:
    """The artifact's section for a backup stored in plain text: no links, the ways to
    download it with the Swift credentials (``OS_*``, as in worker.env) instead."""
    return "\n".join([
        "### Download (no links: stored in plain text)", "",
        "Download links are made for encrypted backups only: a link needs no credentials, and "
        "this backup holds the undercloud's secrets in plain text. With the Swift credentials "
        "(`OS_*`, as in `worker.env`):", "",
        f"- `swift download {container} --prefix {backup_id}/`, then compare each object's "
        "`sha256sum` with `manifest.json` (or run `sha256sum -c SHA256SUMS` when signed);",
        f"- or restore it: `python -m flows.restore --container {container} --backup-id "
        f"{backup_id} --target DIR` (docs/restore.md)."])
