"""A TCP proxy on loopback that the fault tests put between the daemon and a server, to drop,
stall or half-close the connections at chosen moments. It runs its own event loop in a thread,
so the test (and the daemon, a separate process) see it as any other server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Final

from tests.servers import HOST, free_port

CHUNK: Final = 65536


class Proxy:
    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._flowing = asyncio.Event()

    # -- the test's side ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def drop(self) -> None:
        """Reset every open connection (as a crashed middlebox would)."""
        self._call(self._drop)

    def half_close(self) -> None:
        """Close the server's direction of every open connection: the client reads EOF while
        its writes still seem to go through."""
        self._call(self._half_close)

    def stall(self, seconds: float) -> None:
        """Forward nothing, either way, for ``seconds`` (connections stay open)."""
        self._call(self._stall, seconds)

    def _call(self, fn: object, *args: object) -> None:
        async def go() -> None:
            fn(*args)  # type: ignore[operator]

        asyncio.run_coroutine_threadsafe(go(), self._loop).result(10)

    # -- the proxy ----------------------------------------------------------------------------
    async def _start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, HOST, self.port)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._drop()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            client_w.close()
            return
        pair = (client_w, server_w)
        self._pipes.add(pair)
        try:
            await asyncio.gather(
                self._pump(client_r, server_w),
                self._pump(server_r, client_w),
                return_exceptions=True,
            )
        finally:
            self._pipes.discard(pair)
            for writer in pair:
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()

    def _drop(self) -> None:
        for client_w, server_w in list(self._pipes):
            for writer in (client_w, server_w):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    # RST instead of FIN: what a connection lost on the way looks like.
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                writer.transport.abort()
        self._pipes.clear()

    def _half_close(self) -> None:
        for client_w, _server_w in list(self._pipes):
            with contextlib.suppress(OSError):
                client_w.write_eof()

    def _stall(self, seconds: float) -> None:
        self._flowing.clear()
        self._loop.call_later(seconds, self._flowing.set)
