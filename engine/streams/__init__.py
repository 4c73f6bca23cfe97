"""Streams: the reference's object streaming API, and tensor payloads moved as resumable chunk sessions."""

from engine.streams.objects import (
    ConsumerFactory,
    LocalStreamNetwork,
    ObjectConsumer,
    ObjectProducer,
    ObjectStreamer,
    StreamableEngine,
    StreamContext,
    StreamContextKey,
)
from engine.streams.sessions import ReceiveSession, SendSession, StreamReport, StreamTimeout

__all__ = ["ConsumerFactory", "LocalStreamNetwork", "ObjectConsumer", "ObjectProducer", "ObjectStreamer",
           "ReceiveSession", "SendSession", "StreamContext", "StreamContextKey", "StreamReport", "StreamTimeout",
           "StreamableEngine"]
