"""The HTTP connections `trit serve` accepts: uvicorn with the bounds a
server facing untrusted clients needs.

- A connection must finish a request's headers within `request_timeout`
  seconds of opening (or of its previous response): uvicorn's own
  `timeout_keep_alive` only covers an idle connection after a response, so a
  client that sends half a header line would otherwise hold its socket for
  ever. The body has the same time limit, enforced by the app (`create_app`).
- Headers are at most MAX_HEADER_BYTES (h11 answers 431 beyond).
- At most `max_connections` connections at once; uvicorn answers 503 beyond.
- trit's own log lines ("trit.server") go where uvicorn's go, at its level.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEADER_BYTES = 16 << 10
"""The request line and headers together (h11's default, stated here)."""


def _timed_h11(request_timeout: float) -> type[asyncio.Protocol]:
    class TimedH11Protocol(H11Protocol):
        """uvicorn's h11 protocol, closing a connection whose next request's
        headers have not arrived `request_timeout` seconds after it opened or
        after its last response."""

        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            if self.transport.is_closing():
                return
            # A new request's cycle replaces this one once its headers are read;
            # one read already (pipelined) has its own cycle, not complete.
            cycle = self.cycle
            self._header_timer = self.loop.call_later(request_timeout, self._headers_overdue, cycle)

        def _headers_overdue(self, cycle: Any) -> None:
            self._header_timer = None
            waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.logger.info(
                    "%s:%d - closed: no request headers within %gs",
                    *(self.client or ("?", 0)),
                    request_timeout,
                )
                self.transport.close()

    return TimedH11Protocol


def uvicorn_config(
    app: Any,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    request_timeout: float = 30.0,
    max_connections: int = 256,
) -> uvicorn.Config:
    """uvicorn's configuration for serving `app` with the bounds above."""
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["trit"] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": False,
    }
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config,
        http=_timed_h11(request_timeout),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=5,
    )
