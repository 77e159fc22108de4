"""Running the app with uvicorn: in the foreground (the CLI) or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Self

import uvicorn


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """uvicorn on its own thread and event loop; port 0 picks a free port (bound before start: no race).

        with ServerThread(app) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self._sock = _bind(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, access_log=False)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Self:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the uvicorn server thread exited during start-up (see its log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: the backend stops admitting (503) and gives open streams `drain` seconds to finish,
    then aborts them with a final error event; uvicorn waits a little longer than that for them to close."""

    def __init__(self, config: uvicorn.Config, backend: Any, drain: float):
        super().__init__(config)
        self.backend, self.drain = backend, drain

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.backend is not None and not self.backend.draining:
            try:
                import asyncio

                asyncio.get_running_loop()  # the signal arrives on the event loop's thread
                self.backend.begin_drain(self.drain)
            except RuntimeError:
                pass
        super().handle_exit(sig, frame)


def serve_forever(app: Any, host: str, port: int, log_level: str = "info", *, backend: Any = None,
                  drain_timeout: float = 30.0) -> None:
    """Blocking; SIGTERM or Ctrl-C drain it (see _DrainingServer), a second one stops it at once."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout + 3)
    _DrainingServer(config, backend, drain_timeout).run()


__all__ = ["ServerThread", "serve_forever"]
