"""Credentials for a federation: one per site and one for the admin, never shared.

``provision(DIR, sites)`` writes::

    DIR/server/credentials.json     every identity: name, role, salted hash of its token
    DIR/<name>/credentials.json     one identity's own token and the server URL
    DIR/server/tls/...              (``tls=True``) a private CA and the server certificate
    DIR/<name>/ca.pem               (``tls=True``) the CA that identity trusts

Every file is written atomically with mode 0600 inside 0700 folders. The server
file holds no token, only ``HMAC-SHA256(salt, token)``: tokens are 256-bit random
secrets, so a fast keyed hash is enough (a slow password hash would only cost
every request time). A token names its identity (``fl1.<name>.<secret>``) so the
server checks exactly one hash per request.

Running it again adds new identities and keeps existing ones valid; naming an
identity that already exists is refused unless ``force`` (which replaces its
token, so the old one stops working). Nothing is written unless every requested
name is acceptable.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from hashlib import sha256
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from engine.errors import ConfigError

__all__ = [
    "DEFAULT_PORT",
    "ROLE_ADMIN",
    "ROLE_SITE",
    "IdentityFile",
    "ProvisionResult",
    "StoredCredential",
    "check_name",
    "hash_token",
    "load_identity",
    "load_server_credentials",
    "new_token",
    "provision",
    "token_name",
]

logger = logging.getLogger(__name__)

ROLE_SITE = "site"
ROLE_ADMIN = "admin"
ROLES = frozenset({ROLE_SITE, ROLE_ADMIN})
DEFAULT_PORT = 8700
SERVER_DIR = "server"
CREDENTIALS_FILE = "credentials.json"
SERVER_FORMAT = "fedlog-credentials/1"
IDENTITY_FORMAT = "fedlog-identity/1"
HASH_SCHEME = "hmac-sha256"
TOKEN_PREFIX = "fl1"

# lower case only: the name is also a folder, and case-insensitive file systems exist
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_RESERVED = frozenset({SERVER_DIR})


@dataclass(frozen=True, slots=True)
class StoredCredential:
    """What the server keeps about one identity: never the token itself."""

    name: str
    role: str
    salt: str
    digest: str
    scheme: str = HASH_SCHEME

    def as_json(self) -> dict[str, str]:
        """The record as stored in ``server/credentials.json``."""
        return {"role": self.role, "scheme": self.scheme, "salt": self.salt, "hash": self.digest}


@dataclass(frozen=True, slots=True)
class IdentityFile:
    """One identity's own credential, as a site or admin tool loads it."""

    name: str
    role: str
    token: str
    server_url: str
    path: Path
    #: the CA certificate to trust for the server (None: plain HTTP or the system's CAs)
    ca_cert: Path | None = None


@dataclass(frozen=True, slots=True)
class ProvisionResult:
    """What a provisioning run did."""

    directory: Path
    server_url: str
    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    tls_dir: Path | None = None


def check_name(name: str) -> str:
    """Return ``name`` if it can name an identity, else raise ConfigError saying why."""
    if not _NAME.match(name):
        raise ConfigError(
            f"identity name {name!r} is not allowed: use 1-63 lower-case letters, digits, '-' "
            "or '_', starting with a letter or digit"
        )
    if name in _RESERVED:
        raise ConfigError(f"identity name {name!r} is reserved")
    return name


def new_token(name: str) -> str:
    """A fresh token for identity ``name`` (256 random bits)."""
    return f"{TOKEN_PREFIX}.{name}.{secrets.token_urlsafe(32)}"


def token_name(token: str) -> str | None:
    """The identity a token claims to belong to (None if it is not a fedlog token)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not _NAME.match(parts[1]) or not parts[2]:
        return None
    return parts[1]


def hash_token(token: str, salt: bytes) -> str:
    """The salted hash the server stores for ``token`` (hex)."""
    return hmac.new(salt, token.encode("utf-8"), sha256).hexdigest()


def _credential(name: str, role: str, token: str) -> StoredCredential:
    salt = secrets.token_bytes(16)
    return StoredCredential(name, role, salt.hex(), hash_token(token, salt))


def load_server_credentials(path: Path | str) -> tuple[str, dict[str, StoredCredential], dict[str, Any]]:
    """Read ``server/credentials.json`` (the file or its folder).

    Returns:
        (server URL, credentials by name, the TLS section or an empty dict).

    Raises:
        ConfigError: the file is missing, unreadable or not a fedlog credentials file.
    """
    file = _file(Path(path))
    data = _read_json(file, SERVER_FORMAT)
    creds: dict[str, StoredCredential] = {}
    try:
        for name, rec in data["identities"].items():
            if rec["role"] not in ROLES or rec["scheme"] != HASH_SCHEME:
                raise ConfigError(f"{file}: identity {name!r} has an unknown role or hash scheme")
            bytes.fromhex(rec["salt"])
            creds[name] = StoredCredential(name, rec["role"], rec["salt"], rec["hash"], rec["scheme"])
        return str(data["server_url"]), creds, dict(data.get("tls") or {})
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{file}: malformed credentials file ({exc!r})") from None


def load_identity(path: Path | str) -> IdentityFile:
    """Read one identity's ``credentials.json`` (the file or its folder).

    Raises:
        ConfigError: missing, unreadable or malformed file.
    """
    file = _file(Path(path))
    data = _read_json(file, IDENTITY_FORMAT)
    mode = file.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is readable by other users (mode %o); it holds a secret token",
                       file, stat.S_IMODE(mode))
    try:
        ca = data.get("ca_cert")
        return IdentityFile(
            name=check_name(data["name"]), role=data["role"], token=data["token"],
            server_url=data["server_url"], path=file,
            ca_cert=(file.parent / ca) if ca else None,
        )
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{file}: malformed identity file ({exc!r})") from None


def provision(
    directory: Path | str,
    sites: Sequence[str],
    *,
    server_url: str | None = None,
    admin_name: str = "admin",
    tls: bool = False,
    force: bool = False,
    rotate_admin: bool = False,
) -> ProvisionResult:
    """Create credentials for ``sites`` (and the admin, if missing) under ``directory``.

    Args:
        directory: the provisioning folder (created if missing).
        sites: names of the sites to create (or, with ``force``, to re-issue).
        server_url: the URL sites will call; default: the one recorded by an earlier
            run, else ``http(s)://127.0.0.1:8700``.
        admin_name: the admin identity's name.
        tls: also make (or reuse) a private CA and a server certificate for the URL's host.
        force: replace the credentials of named identities that already exist.
        rotate_admin: replace the admin's credential too.

    Returns:
        What was created, replaced and kept.

    Raises:
        ConfigError: a bad or duplicate name, an existing identity without ``force``,
            a URL that does not fit ``tls``; nothing is written then.
    """
    root = Path(directory)
    names = [check_name(s.strip()) for s in sites if s.strip()]
    check_name(admin_name)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"site name(s) given twice: {', '.join(dupes)}")
    if admin_name in names:
        raise ConfigError(f"{admin_name!r} is the admin's name; a site cannot have it")

    server_file = root / SERVER_DIR / CREDENTIALS_FILE
    existing: dict[str, StoredCredential] = {}
    old_url: str | None = None
    tls_info: dict[str, Any] = {}
    if server_file.exists():
        old_url, existing, tls_info = load_server_credentials(server_file)
    # once a federation has a CA, every identity added later must trust it too
    tls = tls or bool(tls_info)
    url = _server_url(server_url or old_url, tls)
    if existing.get(admin_name, None) is not None and existing[admin_name].role != ROLE_ADMIN:
        raise ConfigError(f"{admin_name!r} exists and is not the admin")
    present = {n for n in [*names, admin_name]
               if n in existing or (root / n / CREDENTIALS_FILE).exists()}
    clash = sorted(present & set(names))
    if clash and not force:
        raise ConfigError(
            f"identit{'y' if len(clash) == 1 else 'ies'} {', '.join(clash)} already exist in {root}; "
            "pass --force to issue new tokens (the old ones stop working)"
        )
    for n in clash:
        if n in existing and existing[n].role != ROLE_SITE:
            raise ConfigError(f"{n!r} exists with role {existing[n].role!r}, not a site")

    todo = [(n, ROLE_SITE) for n in names]
    if admin_name not in present or rotate_admin:
        todo.append((admin_name, ROLE_ADMIN))
    result = ProvisionResult(root, url)
    for n in existing:
        if n not in dict(todo):
            result.kept.append(n)

    if not root.exists():
        _private_dir(root)  # an existing folder (even ".") keeps its mode; our subfolders are 0700
    _private_dir(root / SERVER_DIR)
    ca_pem: bytes | None = None
    if tls:
        from engine.server.tls import ensure_certificates

        host = urlsplit(url).hostname or "127.0.0.1"
        files = ensure_certificates(root / SERVER_DIR / "tls", [host])
        ca_pem = files.ca_cert.read_bytes()
        tls_info = {"ca": "tls/ca.pem", "cert": "tls/server.pem", "key": "tls/server.key"}
        result = replace(result, tls_dir=files.directory)

    creds = dict(existing)
    # identity files first: a token is useless until the server file lists its hash
    for name, role in todo:
        token = new_token(name)
        folder = root / name
        _private_dir(folder)
        if ca_pem is not None:
            _write_private(folder / "ca.pem", ca_pem)
        doc = {"format": IDENTITY_FORMAT, "name": name, "role": role, "token": token,
               "server_url": url, "ca_cert": "ca.pem" if ca_pem is not None else None}
        _write_private(folder / CREDENTIALS_FILE, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        (result.replaced if name in present else result.created).append(name)
        creds[name] = _credential(name, role, token)
    server_doc: dict[str, Any] = {
        "format": SERVER_FORMAT, "server_url": url,
        "identities": {n: c.as_json() for n, c in sorted(creds.items())},
    }
    if tls_info:
        server_doc["tls"] = tls_info
    _write_private(server_file, orjson.dumps(server_doc, option=orjson.OPT_INDENT_2))
    logger.info("provisioned %s: created %s, replaced %s", root, result.created, result.replaced)
    return result


def _server_url(given: str | None, tls: bool) -> str:
    if given is None:
        return f"{'https' if tls else 'http'}://127.0.0.1:{DEFAULT_PORT}"
    parts = urlsplit(given)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"server URL {given!r} must look like http://HOST:PORT or https://HOST:PORT")
    if tls and parts.scheme != "https":
        raise ConfigError(f"--tls needs an https:// server URL, got {given!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ConfigError(f"server URL {given!r}: {exc}") from None
    return given.rstrip("/")


def _file(path: Path) -> Path:
    return path / CREDENTIALS_FILE if path.is_dir() else path


def _read_json(file: Path, fmt: str) -> dict[str, Any]:
    try:
        data = orjson.loads(file.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such credentials file (run `fedlog provision` first)") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ConfigError(f"{file}: not a {fmt} file")
    return data


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
