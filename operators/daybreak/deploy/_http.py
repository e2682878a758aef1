"""``daybreak serve``'s HTTP/1.1 protocol: uvicorn's httptools protocol, with a header timeout,
and ``POST /invocations`` answered below ASGI when it can be.

Header timeout. uvicorn only times keep-alive idleness between requests. Here a timer runs from
the connection's start until its first request's headers are complete, and from a request's
first byte only when its headers do not come in the same read (a timer armed and cancelled per
request cost about 3 us). Past it: the timeout answer, and the connection is closed.

The fast path. At one row per request, uvicorn's ASGI machinery (a scope dict, a task, an event
and two messages per request, written by an awaited ``send``) cost as much CPU as daybreak's
whole parse-predict-log. So a request is answered by this protocol itself when it is a
``POST /invocations`` (exact path, no query) over HTTP/1.1 with a ``Content-Length`` of at most
``inline_bytes``, no ``Transfer-Encoding``, ``Expect`` or upgrade, on a connection with nothing
else in flight, and its whole body arrived in the same read as its headers. Its headers and body
go to ``fast(headers, body, reply)`` (``Invocations.fast``: the same checks and answers as the
ASGI path), and ``reply`` writes the response. Everything else (other paths, ``?raw=1``, bodies
that arrive in pieces or are chunked, pipelined requests behind one in flight, HTTP/1.0) goes
through uvicorn's ASGI cycle unchanged, with the body deadline and in-flight accounting of
``Invocations.read_body``. HTTP parsing, its errors and limits stay httptools' and uvicorn's.

Order and back-pressure hold as in uvicorn: while a fast request is in flight, a request behind
it on the same connection waits in uvicorn's pipeline with reading paused; a response the client
does not read (the transport's buffer past its high-water mark) holds the next request until
the client reads it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

PATH = b"/invocations"

MAX_HEADER_BYTES = 64 * 2**10
"""A request's headers (request line included) past this many bytes: 431, and the connection is
closed. uvicorn's httptools protocol has no such limit, and httptools grows a long header value
by repeated copies: a 64 MiB header was accepted in 3 s and stalled the other clients for 2 s."""

Reply = Callable[[int, bytes, str | None, str], None]  # status, JSON body, model version, request id
Fast = Callable[[list[tuple[bytes, bytes]], bytes, Reply], None]


def protocol(header_timeout: float, error_body: Callable[[int, str], bytes], fast: Fast | None = None,
             inline_bytes: int = 64 * 2**10, max_header_bytes: int = MAX_HEADER_BYTES) -> type | str:
    """The protocol class for ``uvicorn.run(http=...)``: `error_body(status, message)` is the
    JSON body of an error (the server's format); `fast` answers fast-path requests (None: ASGI
    only). Late headers get 408 and headers that grow past `max_header_bytes` 431; then the
    connection is closed."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn's h11, without a header timeout or the fast path
        log.warning("httptools is not installed: no header read timeout")
        return "h11"

    def closing(status: int, message: str) -> bytes:
        """A whole error response that closes the connection."""
        body = error_body(status, message)
        return (STATUS_LINE[status] + b"content-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (len(body), body))

    timed_out = closing(408, f"the request headers did not arrive within {header_timeout:g} s "
                             f"(DAYBREAK_SERVE_HEADER_TIMEOUT)")
    too_large = closing(431, f"request headers over {max_header_bytes} bytes")
    defaults: list[object] = [None, b""]  # the server's default headers (date, server) and their bytes

    def default_headers(current: list[tuple[bytes, bytes]]) -> bytes:
        if current is not defaults[0]:  # uvicorn replaces the list when the date changes
            defaults[0], defaults[1] = current, b"".join(b"%s: %s\r\n" % kv for kv in current)
        return defaults[1]  # type: ignore[return-value]

    class DaybreakHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _headers_pending = False  # a request began and its headers are not complete
        _body: list[bytes] | None = None  # a fast request's body so far (None: not reading one)
        _busy = False  # a fast request is in flight (until its response is written and drained)
        _drain = False  # its response waits for the client to read
        _keep = True  # keep the connection after it
        _header_bytes = 0  # bytes read while a request's headers are incomplete
        _began = False  # a request began in the current read

        # --- the header timeout

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self._busy or (self.cycle is not None and not self.cycle.response_complete):
                self._arm()  # a request is being answered (the next one waits, pipelined): not idle
                return
            self.transport.write(timed_out)
            self.transport.close()

        # --- parser callbacks

        def data_received(self, data: bytes) -> None:
            self._began = False
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self._body is not None:
                self._to_asgi()  # its body comes in pieces: uvicorn's cycle reads the rest, within its deadline
            if not self._headers_pending:
                self._header_bytes = 0
                return
            # Headers incomplete after this read may not grow past max_header_bytes. The bytes of the
            # read their request began in are not counted (its start in the read is not known): at
            # most one read (uvloop's 256 KiB) more.
            self._header_bytes = 0 if self._began else self._header_bytes + len(data)
            if self._header_bytes > max_header_bytes:
                self.transport.write(too_large)
                self.transport.close()
                return
            if self._header_timer is None:
                self._arm()

        def on_message_begin(self) -> None:
            # A request answered at once (a fast refusal) arms uvicorn's keep-alive timer inside a
            # read; another request of that read must not be cut off by it.
            self._unset_keepalive_if_required()
            self._began = True
            # uvicorn's scope is made only for a request ASGI answers (``_scope``)
            self.url = b""
            self.expect_100_continue = False
            self.headers = []
            self._headers_pending = True

        def _scope(self) -> None:
            url, headers, expect = self.url, self.headers, self.expect_100_continue
            HttpToolsProtocol.on_message_begin(self)
            self.url, self.headers, self.expect_100_continue = url, headers, expect
            self.scope["headers"] = headers

        def on_headers_complete(self) -> None:
            self._headers_pending = False
            self._disarm()
            if fast is not None and self.url == PATH and self._fast_ok():
                self._body = []
                return
            self._scope()
            super().on_headers_complete()

        def _fast_ok(self) -> bool:
            if self._busy or self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
                return False
            parser = self.parser
            if (parser.get_method() != b"POST" or parser.get_http_version() != "1.1" or self.expect_100_continue
                    or parser.should_upgrade()):
                return False
            limit = self.limit_concurrency  # over it, uvicorn's cycle answers 503
            if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
                return False
            length = None
            for name, value in self.headers:
                if name == b"content-length":
                    length = value
                elif name == b"transfer-encoding":
                    return False
            return length is not None and length.isdigit() and int(length) <= inline_bytes

        def on_body(self, body: bytes) -> None:
            if self._body is not None:
                self._body.append(body)
            else:
                super().on_body(body)

        def on_message_complete(self) -> None:
            chunks = self._body
            if chunks is None:
                super().on_message_complete()
                return
            self._body = None
            self._busy, self._keep = True, self.parser.should_keep_alive()
            assert fast is not None
            fast(self.headers, chunks[0] if len(chunks) == 1 else b"".join(chunks), self._reply)

        def _to_asgi(self) -> None:
            """A fast-path request whose body did not come whole with its headers: uvicorn's cycle
            takes it from here (``on_headers_complete`` reads only the parser's state so far)."""
            chunks, self._body = self._body, None
            self._scope()
            super().on_headers_complete()
            for chunk in chunks or ():
                super().on_body(chunk)

        # --- the fast path's response

        def _reply(self, status: int, payload: bytes, served: str | None, request_id: str) -> None:
            if self.transport.is_closing():  # the client went away
                self._busy = False
                return
            head = [STATUS_LINE[status], default_headers(self.server_state.default_headers),
                    b"content-type: application/json\r\ncontent-length: %d\r\nx-request-id: %s\r\n"
                    % (len(payload), request_id.encode())]
            if served is not None:
                head.append(b"x-model-version: %s\r\n" % served.encode())
            if status == 503:
                head.append(b"retry-after: 1\r\n")
            if not self._keep:
                head.append(b"connection: close\r\n")
            head += (b"\r\n", payload)
            self.transport.write(b"".join(head))
            if self.flow.write_paused:  # the client is not reading: nothing more until it does
                self._drain = True
                self.flow.pause_reading()
                return
            self._answered()

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._drain:
                self._drain = False
                self._answered()

        def _answered(self) -> None:
            self._busy = False
            if not self._keep:
                self.transport.close()
            self.on_response_complete()  # uvicorn's: keep-alive timer, reading on, the pipeline's next

        def _start_asgi_task(self, cycle: object, app: object) -> None:
            if self._busy:  # behind a fast request in flight: uvicorn's pipeline, reading paused
                self.flow.pause_reading()
                self.pipeline.appendleft((cycle, app))  # type: ignore[arg-type]
                return
            super()._start_asgi_task(cycle, app)  # type: ignore[arg-type]

        def shutdown(self) -> None:
            if self._busy:  # answered, then closed
                self._keep = False
                if self.cycle is not None:
                    self.cycle.keep_alive = False
                return
            super().shutdown()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._drain = False
            super().connection_lost(exc)

    return DaybreakHttpProtocol
