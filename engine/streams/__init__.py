"""Streams: chunks of tensor payloads moved between chunk stores as resumable, recorded sessions."""

from engine.streams.sessions import ReceiveSession, SendSession, StreamReport, StreamTimeout

__all__ = ["ReceiveSession", "SendSession", "StreamReport", "StreamTimeout"]
