"""A deadline on request headers (slow-loris): aiohttp bounds an idle connection
(keepalive_timeout) but not one that trickles a request's headers a byte at a time, which
holds a connection, its parser and its buffers forever. Here a request whose headers have begun
to arrive must complete them within server.header_timeout (LMC_HEADER_TIMEOUT); otherwise the
client gets a 408 and the connection is closed. The body has its own deadline (invoke.read_body,
LMC_BODY_TIMEOUT).

aiohttp's RequestHandler has no hook for this, so the server's protocol class is a subclass
that watches its own parser: a deadline is armed when bytes arrive while no request is parsed or
in progress, and cleared when the request's head has been parsed."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("lmc.server")

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class HeaderDeadlineHandler(RequestHandler):
    __slots__ = ("_lmc_timeout", "_lmc_deadline", "_lmc_count")

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lmc_timeout = header_timeout
        self._lmc_deadline: asyncio.TimerHandle | None = None
        self._lmc_count = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_count != self._lmc_count:  # a request's head was parsed: in time
            self._lmc_count = self._request_count
            self._cancel_deadline()
        if (self._lmc_deadline is None and data and not self._messages
                and not self._request_in_progress and not self._force_close):
            # Bytes of a head that is not complete yet: it has header_timeout to complete.
            self._lmc_deadline = self._loop.call_later(self._lmc_timeout, self._expired,
                                                       self._request_count)

    def _cancel_deadline(self) -> None:
        if self._lmc_deadline is not None:
            self._lmc_deadline.cancel()
            self._lmc_deadline = None

    def _expired(self, count: int) -> None:
        self._lmc_deadline = None
        transport = self.transport
        if transport is None or transport.is_closing() or self._request_count != count:
            return
        if self._request_in_progress or self._messages:
            return
        body = (b'{"code": 408, "type": "RequestTimeout", "message": "the request headers did '
                b'not arrive within %g s (LMC_HEADER_TIMEOUT)"}' % self._lmc_timeout)
        log.info("closing a connection whose request headers did not arrive within %g s",
                 self._lmc_timeout)
        transport.write(_TIMEOUT_RESPONSE % (len(body), body))
        self.force_close()
        transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)


class _Server(web.Server):
    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lmc_header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return HeaderDeadlineHandler(self, loop=self._loop, header_timeout=self._lmc_header_timeout,
                                     **self._kwargs)


class AppRunner(web.AppRunner):
    """web.AppRunner whose connections have a header deadline."""

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self._lmc_header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # same state, our protocol factory
        server._lmc_header_timeout = self._lmc_header_timeout
        return server
