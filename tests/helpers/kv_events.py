"""A real ZeroMQ subscriber of vLLM's KV-event publisher (``--kv-events-config`` with the
``zmq`` publisher), as a cache-aware router runs one."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import zmq
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch


class KVEventSubscriber:
    """SUB socket on ``endpoint`` (e.g. ``tcp://127.0.0.1:PORT``); collects every event."""

    def __init__(self, endpoint: str, topic: str = ""):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sock.connect(endpoint)
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self.events: list[Any] = []

    def poll(self, timeout: float = 0.0) -> list[Any]:
        """Receive what arrived within ``timeout`` seconds; returns the new events."""
        new: list[Any] = []
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            if not self._sock.poll(int(left * 1000)):
                break
            frames = self._sock.recv_multipart()
            new.extend(self._decoder.decode(frames[-1]).events)
        self.events.extend(new)
        return new

    def wait_for(self, pred, timeout: float) -> list[Any]:
        """Poll until ``pred(all events so far)`` holds or ``timeout`` passes; returns all."""
        deadline = time.monotonic() + timeout
        while not pred(self.events) and time.monotonic() < deadline:
            self.poll(0.2)
        return self.events

    def stored(self, medium: str | None = None) -> list[BlockStored]:
        return [e for e in self.events
                if isinstance(e, BlockStored) and (medium is None or e.medium == medium)]

    def removed(self, medium: str | None = None) -> list[BlockRemoved]:
        return [e for e in self.events
                if isinstance(e, BlockRemoved) and (medium is None or e.medium == medium)]

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
