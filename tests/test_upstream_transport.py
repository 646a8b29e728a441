"""The upstream transport (httpx's API over aiohttp): each way a provider's server can fail
reaches the reply as the error the user is told about, against a real socket server."""

import asyncio
import contextlib

import httpx
import pytest

from chatapp.providers.openai_compat import transport_failure
from chatapp.providers.registry import _http_client
from chatapp.providers.transport import UpstreamTransport

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@contextlib.asynccontextmanager
async def server(behaviour):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        try:
            await behaviour(writer)
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    finally:
        srv.close()


async def read_all(url: str, *, read_timeout: float = 5.0) -> list[bytes]:
    client = _http_client()
    assert isinstance(client._transport, UpstreamTransport)
    chunks = []
    try:
        timeout = httpx.Timeout(5.0, read=read_timeout)
        async with client.stream("POST", url, content=b"{}", timeout=timeout) as response:
            async for data in response.aiter_raw():
                chunks.append(data)
    finally:
        await client.aclose()
    return chunks


async def test_a_whole_stream_arrives():
    async def whole(writer):
        writer.write(HEAD + chunk(b"data: one\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async with server(whole) as url:
        assert b"".join(await read_all(url)) == b"data: one\n\ndata: [DONE]\n\n"


async def test_a_server_that_hangs_up_mid_reply_is_a_connection_failure():
    async def hang_up(writer):
        writer.write(HEAD + chunk(b"data: one\n\n"))
        await writer.drain()

    async with server(hang_up) as url:
        with pytest.raises(httpx.TransportError) as caught:
            await read_all(url)
    assert transport_failure(caught.value)[1] == "upstream_connection"


async def test_a_refused_connection_is_a_connection_failure_not_a_timeout():
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    with pytest.raises(httpx.ConnectError) as caught:
        await read_all(f"http://127.0.0.1:{port}")
    assert transport_failure(caught.value)[1] == "upstream_connection"


async def test_a_stalled_stream_is_a_read_timeout():
    async def stall(writer):
        writer.write(HEAD + chunk(b"data: one\n\n"))
        await writer.drain()
        await asyncio.sleep(3)

    async with server(stall) as url:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await read_all(url, read_timeout=0.3)
    assert transport_failure(caught.value)[1] == "upstream_stalled"
