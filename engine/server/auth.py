"""Who is calling: bearer tokens checked against the provisioned credential hashes.

Every request to a non-public route carries ``Authorization: Bearer <token>``. The
token names its identity, so the ``CredentialStore`` computes exactly one salted
hash and compares it in constant time. An unknown name costs the same work as a
wrong secret and gets the same answer, so probing does not reveal which identities
exist. Failures raise the HTTP layer's 401 (with ``WWW-Authenticate``, as RFC 6750
asks); the ``App`` reports them, and role refusals (403), to the audit hook.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from engine.provision import (
    ROLE_ADMIN,
    ROLE_SITE,
    StoredCredential,
    hash_token,
    load_server_credentials,
    token_name,
)
from engine.server.errors import HttpError

__all__ = [
    "ADMIN_ONLY",
    "ANY_ROLE",
    "SITES_ONLY",
    "AuditEvent",
    "AuditHook",
    "Authenticator",
    "CredentialStore",
    "Identity",
]

logger = logging.getLogger(__name__)

ANY_ROLE = frozenset({ROLE_SITE, ROLE_ADMIN})
ADMIN_ONLY = frozenset({ROLE_ADMIN})
SITES_ONLY = frozenset({ROLE_SITE})

_REALM = 'Bearer realm="fedlog"'
# a fixed salt and digest so that an unknown name costs one HMAC, like a known one
_DUMMY_SALT = bytes(16)
_DUMMY_DIGEST = hash_token("fl1.unknown.x", _DUMMY_SALT)


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: a site or the admin."""

    name: str
    role: str


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """An access failure, for the server's audit record. It changes nothing else."""

    kind: Literal["unauthenticated", "forbidden"]
    method: str
    path: str
    #: the matched route template
    route: str | None
    #: the identity (for 403) or the name a rejected token claimed (for 401), if any
    identity: str | None
    role: str | None
    reason: str
    client: str | None


#: called for each refusal; may return an awaitable that the refusal's answer waits for (a durable record)
AuditHook = Callable[[AuditEvent], Awaitable[None] | None]


class Authenticator(Protocol):
    """Turns an ``Authorization`` header into an ``Identity`` or raises a 401 ``HttpError``."""

    def authenticate(self, authorization: str | None) -> Identity:
        """Return the caller's identity for this header value (None: header absent)."""
        ...


def _unauthenticated(message: str, error: str | None, claimed: str | None = None) -> HttpError:
    challenge = _REALM if error is None else f'{_REALM}, error="{error}"'
    details = {"claimed": claimed} if claimed else {}
    return HttpError(401, "unauthenticated", message, headers={"WWW-Authenticate": challenge},
                     details=details)


class CredentialStore:
    """The provisioned identities of one federation (``DIR/server/credentials.json``)."""

    def __init__(self, credentials: dict[str, StoredCredential], source: Path | None = None) -> None:
        self._creds = dict(credentials)
        self._source = source
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path | str) -> CredentialStore:
        """Load the store from the server's credentials file (or its folder)."""
        _, creds, _ = load_server_credentials(path)
        return cls(creds, Path(path))

    @property
    def names(self) -> list[str]:
        """Names of every identity, sorted."""
        return sorted(self._creds)

    def role_of(self, name: str) -> str | None:
        """The role of identity ``name`` (None if unknown)."""
        cred = self._creds.get(name)
        return cred.role if cred else None

    def reload(self) -> None:
        """Read the credentials file again (after ``fedlog provision`` added identities)."""
        if self._source is None:
            return
        _, creds, _ = load_server_credentials(self._source)
        with self._lock:
            self._creds = creds  # one reference swap: readers see the old or the new dict
        logger.info("reloaded %d credentials from %s", len(creds), self._source)

    def authenticate(self, authorization: str | None) -> Identity:
        """Check a bearer token; return its identity or raise a 401 ``HttpError``."""
        if authorization is None or not authorization.strip():
            raise _unauthenticated(
                "this route needs a credential: send 'Authorization: Bearer <token>' with the token "
                "from your credentials.json", None)
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise _unauthenticated(
                f"unsupported authorization scheme {scheme!r}; use 'Bearer <token>'", "invalid_request")
        token = token.strip()
        name = token_name(token)
        cred = self._creds.get(name) if name is not None else None
        if cred is None:
            # same work as a real check, then the same answer as a wrong secret
            hmac.compare_digest(hash_token(token, _DUMMY_SALT), _DUMMY_DIGEST)
            raise _unauthenticated("the token is not valid for this server", "invalid_token", name)
        if not hmac.compare_digest(hash_token(token, bytes.fromhex(cred.salt)), cred.digest):
            raise _unauthenticated("the token is not valid for this server", "invalid_token", name)
        return Identity(cred.name, cred.role)
