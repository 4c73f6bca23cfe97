"""Turn what a user typed for a database (a path or a SQLAlchemy URL) into a URL.

``fedlog ... DB`` accepts ``run.db``, ``/abs/run.db``, ``sqlite:///run.db`` or
``postgresql://user@host/db``; anything else is a ``ConfigError`` that says what
was expected, before any connection is tried.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from engine.errors import ConfigError

__all__ = ["describe", "is_sqlite", "sqlite_path", "to_url"]

_SUPPORTED = ("sqlite", "postgresql")


def to_url(target: str | Path | URL) -> URL:
    """Return a SQLAlchemy URL for ``target`` (a filesystem path or a URL string)."""
    if isinstance(target, URL):
        url = target
    else:
        text = str(target).strip()
        if not text:
            raise ConfigError("empty database location: give a file path or a URL such as postgresql://user@host/db")
        if "://" not in text:
            path = Path(text).expanduser()
            if path.is_dir():
                raise ConfigError(f"database path {text!r} is a directory; give a file such as {text.rstrip('/')}/fedlog.db")
            url = URL.create("sqlite+pysqlite", database=str(path.resolve()))
        else:
            try:
                url = make_url(text)
            except (ArgumentError, ValueError) as exc:  # ValueError: e.g. a non-numeric port
                raise ConfigError(f"not a database URL: {text!r} ({exc})") from None
    backend = url.get_backend_name()
    if backend not in _SUPPORTED:
        raise ConfigError(
            f"unsupported database {backend!r} in {url.render_as_string(hide_password=True)!r}; "
            "use a SQLite path or sqlite:///FILE, or postgresql://USER@HOST[:PORT]/DB"
        )
    if backend == "postgresql":
        if not url.database:
            raise ConfigError(
                f"the PostgreSQL URL {url.render_as_string(hide_password=True)!r} names no database; "
                "use postgresql://USER@HOST[:PORT]/DB"
            )
        url = url.set(drivername="postgresql+psycopg")
    else:
        url = url.set(drivername="sqlite+pysqlite")
        file = sqlite_path(url)
        # checked here, before any connection: SQLite would only say "unable to open database file"
        if file is not None and not file.parent.is_dir():
            raise ConfigError(f"cannot use the database {file}: directory {file.parent} does not exist")
    return url


def is_sqlite(url: URL) -> bool:
    """True for SQLite URLs (file or memory)."""
    return url.get_backend_name() == "sqlite"


def sqlite_path(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for an in-memory database."""
    if not is_sqlite(url) or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def describe(url: URL) -> str:
    """A printable location: the file path for SQLite, the URL without password otherwise."""
    path = sqlite_path(url)
    if path is not None:
        return str(path)
    # without the driver suffix: the form a user types (and can paste into a command)
    return url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)
