"""Fixtures of the client tests: the server tests' sample app and federation."""

from tests.server.support import connect, federation, sample

__all__ = ["connect", "federation", "sample"]
