"""The host's end of the pipes to the worker, written for a hostile peer: user code in the worker can write
anything to the reply pipe (or nothing), so every read is bounded in size and by a deadline, every reply
must carry the nonce of the request it answers, and every write to the worker has a deadline too.
Whatever goes wrong raises `ProtocolError`, which the sandbox turns into 'session died, call restart()'."""

from __future__ import annotations

import json
import os
import select
import time
from typing import Any

HEADER = 8


class ProtocolError(Exception):
    """The worker broke the protocol: the session cannot be trusted any more."""


class PeerClosed(ProtocolError):
    """A pipe to the worker closed: it died (or closed its end, which is as good as dead)."""


class Channel:
    def __init__(self, req_w: int, resp_r: int, max_message: int) -> None:
        self.req_w, self.resp_r, self.max_message = req_w, resp_r, max_message
        self._buf = bytearray()
        os.set_blocking(req_w, False)

    def send(self, message: dict[str, Any], deadline: float) -> None:
        data = json.dumps(message).encode("utf-8", "surrogatepass")
        data = len(data).to_bytes(HEADER, "big") + data
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [self.req_w], [], left)[1]:
                raise ProtocolError("the worker did not take its request in time")
            try:
                view = view[os.write(self.req_w, view):]
            except BlockingIOError:
                continue
            except OSError as e:
                raise PeerClosed(f"the request pipe is closed ({e.strerror})") from None

    def pending(self) -> bool:
        """Bytes waiting before any request was sent: a reply nobody asked for."""
        return bool(self._buf) or bool(select.select([self.resp_r], [], [], 0)[0])

    def partial(self) -> bool:
        return bool(self._buf)

    def receive(self, deadline: float) -> dict[str, Any] | None:
        """One message, or None if none was complete by the deadline (a partial one stays buffered)."""
        while True:
            message = self._take()
            if message is not None:
                return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.resp_r], [], [], left)[0]:
                return None
            want = HEADER - len(self._buf) if len(self._buf) < HEADER else self._size() + HEADER - len(self._buf)
            try:
                chunk = os.read(self.resp_r, min(max(want, 1), 1 << 20))
            except OSError as e:
                raise PeerClosed(f"the reply pipe failed ({e.strerror})") from None
            if not chunk:
                raise PeerClosed("the worker closed its reply pipe")
            self._buf += chunk

    def _size(self) -> int:
        size = int.from_bytes(self._buf[:HEADER], "big")
        if size > self.max_message:
            raise ProtocolError(f"the worker announced a {size}-byte reply (the limit is {self.max_message})")
        return size

    def _take(self) -> dict[str, Any] | None:
        if len(self._buf) < HEADER:
            return None
        size = self._size()
        if len(self._buf) < HEADER + size:
            return None
        body = bytes(self._buf[HEADER:HEADER + size])
        del self._buf[:HEADER + size]
        try:
            message = json.loads(body.decode("utf-8", "surrogatepass"))
        except ValueError as e:
            raise ProtocolError(f"the worker sent a reply that is not JSON ({e})") from None
        if not isinstance(message, dict):
            raise ProtocolError("the worker sent a reply that is not a JSON object")
        return message


def check_reply(message: dict[str, Any], nonce: str, limit: int) -> dict[str, Any]:
    """A cell's reply, typed and clipped; anything else (another call's nonce, wrong types) is a violation."""
    if message.get("nonce") != nonce:
        raise ProtocolError("the worker sent a reply that does not answer this call (forged or stale)")
    out: dict[str, Any] = {}
    for key in ("stdout", "result", "error", "error_type"):
        value = message.get(key)
        if value is None and key != "stdout":
            out[key] = None
        elif isinstance(value, str):
            out[key] = value if len(value) <= limit + 200 else value[:limit] + " [... cut by the host]"
        else:
            raise ProtocolError(f"the worker sent a reply whose {key!r} is {type(value).__name__}")
    return out
