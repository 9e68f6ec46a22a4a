"""A small closed-loop HTTP load generator for loopback benchmarks (asyncio, raw HTTP/1.1,
keep-alive).

Each of ``concurrency`` virtual clients holds one connection and sends its next request when the
previous answer has arrived. A run stops after ``max_requests`` requests or ``max_seconds``,
whichever comes first. Deliberately minimal, so that the client costs as little CPU as possible
on a 2-core machine where it shares the CPU with the server it measures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

WARM_CALLS = 20  # a blocking client's first calls (connection set-up) are not measured


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput: float  # answered requests per second
    p50_ms: float
    p99_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def summarize(concurrency: int, latencies: list[float], errors: int, elapsed: float) -> LoadResult:
    """A run's result from its answered requests' latencies (seconds)."""
    latencies.sort()
    return LoadResult(
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=round(elapsed, 3),
        throughput=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 0.5) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
    )


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked = None, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def _client(
    host: str,
    port: int,
    request: bytes,
    budget: list[int],
    deadline: float,
    latencies: list[float],
    errors: list[int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status = await _read_response(reader)
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors[0] += 1
    finally:
        writer.close()


async def _run(
    host: str, port: int, request: bytes, concurrency: int, max_requests: int, max_seconds: float
) -> LoadResult:
    latencies: list[float] = []
    errors = [0]
    budget = [max_requests]
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _client(host, port, request, budget, started + max_seconds, latencies, errors)
            for _ in range(concurrency)
        )
    )
    return summarize(concurrency, latencies, errors[0], time.perf_counter() - started)


def http_request(host: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def _loopback_http(url: str) -> tuple[str, int]:
    """HOST and PORT of ``url`` (http://127.0.0.1:PORT); any other host is refused."""
    host, port = url.removeprefix("http://").split(":")
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"this load generator only targets loopback, not {host}")
    return host, int(port)


def _blocking_loop(call: Callable[[], object], max_requests: int, max_seconds: float) -> LoadResult:
    """One caller making blocking ``call()``s back to back (concurrency 1) until ``max_requests``
    calls or ``max_seconds``; every call must succeed (a failure raises: a blocking client has no
    other caller to keep measuring)."""
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + max_seconds
    while len(latencies) < max_requests and time.perf_counter() < deadline:
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    return summarize(1, latencies, 0, time.perf_counter() - started)


def run_load_blocking(
    url: str, path: str, body: bytes, max_requests: int, max_seconds: float
) -> LoadResult:
    """Concurrency 1 over HTTP with a blocking client as lean as ``run_load``'s (one keep-alive
    socket, TCP_NODELAY, the prebuilt request's bytes, the answer read by its Content-Length): the
    REST counterpart of ``run_grpc_blocking_load``, so that REST and gRPC are compared with clients
    of the same style."""
    import socket

    host, port = _loopback_http(url)
    request = http_request(host, path, body)
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = sock.makefile("rb")

        def call() -> None:
            sock.sendall(request)
            status = int(stream.readline()[9:12])
            length = 0
            while (line := stream.readline()) != b"\r\n":
                if not line:
                    raise ConnectionError("the server closed the connection")
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            stream.read(length)
            if status != 200:
                raise RuntimeError(f"HTTP {status}")

        for _ in range(WARM_CALLS):
            call()
        return _blocking_loop(call, max_requests, max_seconds)


def run_load(
    url: str,
    path: str,
    body: bytes,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Closed-loop load against ``url`` (http://127.0.0.1:PORT). Loopback only, by construction of
    the URL."""
    host, port = _loopback_http(url)
    request = http_request(host, path, body, headers)
    return asyncio.run(_run(host, port, request, concurrency, max_requests, max_seconds))


async def _closed_loop(
    call: Callable[[], Awaitable[object]],
    failure: type[BaseException] | tuple[type[BaseException], ...],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
) -> LoadResult:
    """``concurrency`` callers awaiting ``call()`` back to back until ``max_requests`` calls or
    ``max_seconds``; a call raising ``failure`` counts as an error."""
    latencies: list[float] = []
    errors = [0]
    budget = [max_requests]
    started = time.perf_counter()
    deadline = started + max_seconds

    async def one_client() -> None:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            t = time.perf_counter()
            try:
                await call()
            except failure:
                errors[0] += 1
                continue
            latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return summarize(concurrency, latencies, errors[0], time.perf_counter() - started)


def _check_grpc_loopback(url: str) -> None:
    if url.split(":")[0] not in ("127.0.0.1", "localhost"):
        raise ValueError(f"this load generator only targets loopback, not {url}")


async def _run_grpc(
    url: str, model: str, x, concurrency: int, max_requests: int, max_seconds: float
) -> LoadResult:
    import tritonclient.grpc.aio as tca

    async with tca.InferenceServerClient(url) as client:
        tensor = tca.InferInput("input", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        # any failed call counts as an error
        return await _closed_loop(
            lambda: client.infer(model, [tensor]), Exception, concurrency, max_requests, max_seconds
        )


def run_grpc_load(
    url: str, model: str, x, concurrency: int, max_requests: int, max_seconds: float
) -> LoadResult:
    """Closed-loop load over gRPC (KServe v2 ModelInfer through tritonclient.grpc.aio, one channel
    shared by ``concurrency`` callers, as a tritonclient user would), the UINT8 tensor ``x`` sent
    raw. ``url`` is HOST:PORT on loopback."""
    _check_grpc_loopback(url)
    return asyncio.run(_run_grpc(url, model, x, concurrency, max_requests, max_seconds))


async def _run_grpc_raw(
    url: str, request: bytes, concurrency: int, max_requests: int, max_seconds: float
) -> LoadResult:
    import grpc

    async with grpc.aio.insecure_channel(url) as channel:
        # bytes in, bytes out: no client-side protobuf or numpy work per call
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        return await _closed_loop(
            lambda: call(request), grpc.RpcError, concurrency, max_requests, max_seconds
        )


def run_grpc_raw_load(
    url: str, model: str, x, concurrency: int, max_requests: int, max_seconds: float
) -> LoadResult:
    """Closed-loop load over gRPC with a minimal client, as ``run_load`` is for HTTP: one prebuilt
    serialized ModelInferRequest (tritonclient's message, ``x`` raw), sent as bytes on one grpc.aio
    channel. Measures the server's gRPC path with as little client CPU as possible."""
    from tritonclient.grpc import service_pb2

    _check_grpc_loopback(url)
    msg = service_pb2.ModelInferRequest(model_name=model)
    tensor = msg.inputs.add(name="input", datatype="UINT8")
    tensor.shape.extend(x.shape)
    msg.raw_input_contents.append(x.tobytes())
    return asyncio.run(
        _run_grpc_raw(url, msg.SerializeToString(), concurrency, max_requests, max_seconds)
    )


def run_grpc_blocking_load(
    url: str, model: str, x, max_requests: int, max_seconds: float
) -> LoadResult:
    """Concurrency 1 over gRPC with the synchronous ``tritonclient.grpc`` client (the README's
    example): one blocking ``infer`` after another, the UINT8 tensor ``x`` sent raw. A blocking
    gRPC call runs on the caller's thread; grpc.aio's calls are handed between its poller thread
    and the event loop."""
    import tritonclient.grpc as tcg

    _check_grpc_loopback(url)
    client = tcg.InferenceServerClient(url)
    try:
        tensor = tcg.InferInput("input", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        for _ in range(WARM_CALLS):
            client.infer(model, [tensor])
        return _blocking_loop(lambda: client.infer(model, [tensor]), max_requests, max_seconds)
    finally:
        client.close()
