"""Fixtures of the server tests (shared with the client tests through ``support``)."""

from tests.server.support import connect, federation, sample

__all__ = ["connect", "federation", "sample"]
