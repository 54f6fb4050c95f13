"""What is tried again, how long it waits, and what a caller sees when it gives up: against loopback
stand-ins that answer 429, 503 or drop the connection."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import zlib

import pytest
from ttaserve_client import ApiError, AsyncClient, Client, ConnectionFailed, RetryPolicy, array_png, retry_after_s

from tests.conftest import Pixels

FAST = RetryPolicy(retries=3, backoff_s=0.001, max_backoff_s=0.01)
OK_SETS = (200, {"content-type": "application/json"}, b'{"label_sets": []}')


def busy(status: int, retry_after: str) -> tuple[int, dict[str, str], bytes]:
    body = {"error": {"code": "overloaded", "message": "queue full", "request_id": "r-1"}}
    return status, {"retry-after": retry_after, "content-type": "application/json"}, json.dumps(body).encode()


def test_429_with_an_http_date_and_503_are_retried_until_an_answer(scripted):
    date = email.utils.formatdate(usegmt=True)  # now: no wait beyond the backoff
    server = scripted([busy(429, date), busy(503, "0"), OK_SETS])
    with Client(server.url, retries=FAST) as client:
        assert client.label_sets() == []
    assert len(server.seen) == 3


def test_it_gives_up_after_its_retries_with_the_servers_code_and_request_id(scripted):
    server = scripted([busy(429, "0")])
    policy = RetryPolicy(retries=2, backoff_s=0.001, max_backoff_s=0.01)
    with Client(server.url, retries=policy) as client, pytest.raises(ApiError) as raised:
        client.label_sets()
    assert (raised.value.status, raised.value.code, raised.value.request_id) == (429, "overloaded", "r-1")
    assert len(server.seen) == 3  # the first try and two retries


def test_other_errors_are_not_retried(scripted):
    body = {"error": {"code": "unknown_label_set", "message": "no label set 'x'", "request_id": "r-2"}}
    server = scripted([(404, {"content-type": "application/json"}, json.dumps(body).encode())])
    with Client(server.url, retries=FAST) as client, pytest.raises(ApiError) as raised:
        client.label_set("x")
    assert (raised.value.status, raised.value.code, len(server.seen)) == (404, "unknown_label_set", 1)
    assert "r-2" in str(raised.value)


def test_a_reset_connection_is_retried_for_reads_and_classify_but_not_for_creating(scripted):
    server = scripted(["reset", "reset", OK_SETS])
    with Client(server.url, retries=FAST) as client:
        assert client.label_sets() == []
    assert len(server.seen) == 3

    server = scripted(["reset", OK_SETS])
    with Client(server.url, retries=FAST) as client, pytest.raises(ConnectionFailed):
        client.create_label_set("animals", ["cat", "dog"])  # it may have been created: the caller decides
    assert len(server.seen) == 1

    server = scripted(["reset", busy(503, "0"), busy(503, "0"), busy(503, "0")])
    with Client(server.url, retries=FAST) as client, pytest.raises(ApiError) as raised:
        client.classify([array_png(Pixels(8, 8, 1))], labels=["a", "b"])
    assert raised.value.status == 503 and len(server.seen) == 4

    server = scripted(["reset", OK_SETS])
    with Client(server.url, retries=FAST) as client, pytest.raises(ConnectionFailed):
        client.classify([array_png(Pixels(8, 8, 1))], labels=["a", "b"], session="s")  # its images would count twice
    assert len(server.seen) == 1


def test_a_server_that_is_not_there_fails_with_connection_failed():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"  # bound, never listening: refused
        with Client(url, retries=FAST) as client, pytest.raises(ConnectionFailed, match="ConnectError"):
            client.label_sets()


def test_the_async_client_retries_the_same_way(scripted):
    server = scripted(["reset", busy(429, "0"), OK_SETS])

    async def run() -> list[object]:
        async with AsyncClient(server.url, retries=FAST) as client:
            return list(await client.label_sets())

    assert asyncio.run(run()) == []
    assert len(server.seen) == 3


def test_retry_after_sets_the_least_wait_and_backoff_grows_with_jitter():
    assert retry_after_s("2") == 2.0
    assert (
        retry_after_s("Wed, 21 Oct 2015 07:28:05 GMT", now=email.utils.mktime_tz((2015, 10, 21, 7, 28, 0, 0, 1, -1, 0)))
        == 5.0
    )
    assert retry_after_s("soon") is None and retry_after_s(None) is None and retry_after_s("-3") == 0.0
    policy = RetryPolicy(backoff_s=1.0, max_backoff_s=30.0)
    assert policy.wait_s(0, "7") == 7.0  # the server's word is the least wait
    assert policy.wait_s(0, "600") == 30.0  # but never above the cap
    waits = [policy.wait_s(3) for _ in range(200)]
    assert all(0 <= w <= 8.0 for w in waits) and len(set(waits)) > 100  # full jitter below 1 * 2**3


def test_arrays_are_sent_as_png():
    png = array_png(Pixels(3, 2, 5))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
    assert int.from_bytes(png[16:20], "big") == 2 and int.from_bytes(png[20:24], "big") == 3  # width, height
    idat = png.index(b"IDAT")
    rows = zlib.decompress(png[idat + 4 : png.index(b"IEND") - 8])
    assert rows == b"".join(b"\x00" + Pixels(3, 2, 5).tobytes()[y * 6 : (y + 1) * 6] for y in range(3))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        array_png(type("A", (), {"shape": (2, 2, 2), "dtype": "uint8", "tobytes": lambda self: b""})())
