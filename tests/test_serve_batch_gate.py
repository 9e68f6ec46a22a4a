"""Dynamic batching in the replica, in-process (no Ray cluster): a version's requests that queue
while a batch runs on its model go to serve.batch together (kiln.serve.model_server.BatchGate),
however they reach the event loop. gRPC calls reach it one loop turn apart (grpc.aio accepts one
call per turn); with the replica running Kiln's handler on its own loop, serve.batch alone made each
of them a batch of one."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from kiln.serve.config import BatchingConfig
from kiln.serve.limits import LimitsConfig

MODEL_S = 0.05  # one model call: long enough that every request below arrives during one


@pytest.fixture
def runner(monkeypatch):
    """A VersionRunner of a 2-feature table model whose call sleeps MODEL_S (releasing the GIL, as
    a model's forward pass does) and answers each row's first value; ``runner.sizes`` lists the
    rows of each model call. A test that clears ``runner.release`` holds every model call until it
    sets it again (what arrives meanwhile then does not depend on the machine's speed)."""
    from ray.serve import batching

    from kiln.data.preprocess import Preprocessing
    from kiln.models.predictor import Predictor
    from kiln.models.spec import ModelSpec
    from kiln.serve.model_server import VersionRunner
    from kiln.serve.versions import ServedVersion

    # serve.batch reads the replica's max_ongoing_requests to warn about it; there is no replica
    monkeypatch.setattr(
        batching._BatchQueue,
        "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
        lambda self: None,
    )

    release = threading.Event()
    release.set()

    def runtime(x: np.ndarray) -> np.ndarray:
        time.sleep(MODEL_S)
        assert release.wait(30), "the test never released the model call"
        return np.repeat(x[:, :1], 2, axis=1).astype(np.float32)

    prep = Preprocessing(kind="tabular", mean=[0.0, 0.0], std=[1.0, 1.0], feature_names=["a", "b"])
    spec = ModelSpec("mlp", {}, [2], labels=["x", "y"], preprocessing=prep)
    served = ServedVersion("iris", "1", Predictor(spec, runtime, "test"), LimitsConfig())
    sizes: list[int] = []

    class Metrics:
        def batch(self, model: str, version: str, rows: int) -> None:
            sizes.append(rows)

    r = VersionRunner(served, Metrics())
    r.sizes = sizes  # type: ignore[attr-defined]
    r.release = release  # type: ignore[attr-defined]
    yield r
    r._executor.shutdown(wait=True)


def row(i: int) -> np.ndarray:
    return np.array([[float(i), 0.0]], np.float32)


def test_requests_that_queue_while_a_batch_runs_form_the_next_batch(runner):
    """Requests arriving one at a time, each alone in its loop turn, while the first runs: one
    batch of the first, then one of all the others (wait_ms 0: no waiting for more)."""
    runner.configure(BatchingConfig(max_batch_size=32, wait_ms=0.0))

    async def main() -> list[np.ndarray]:
        runner.release.clear()  # the first call runs until every other request has arrived
        tasks = [asyncio.create_task(runner.logits(row(0)))]
        for i in range(1, 10):
            await asyncio.sleep(0.002)  # each in a loop turn of its own, during the first call
            tasks.append(asyncio.create_task(runner.logits(row(i))))
        await asyncio.sleep(0.002)
        runner.release.set()
        return await asyncio.gather(*tasks)

    out = asyncio.run(main())
    assert [float(o[0, 0]) for o in out] == [float(i) for i in range(10)]  # split back in order
    assert runner.sizes == [1, 9]


def test_an_idle_version_runs_each_lone_request_alone(runner):
    """Requests one after the other: the gate is open again once each is answered, so none waits
    for company (each is a batch of one)."""
    runner.configure(BatchingConfig(max_batch_size=32, wait_ms=0.0))

    async def main() -> list[float]:
        return [float((await runner.logits(row(i)))[0, 0]) for i in range(3)]

    assert asyncio.run(main()) == [0.0, 1.0, 2.0]
    assert runner.sizes == [1, 1, 1]


def test_a_batch_holds_at_most_max_batch_size_and_wait_ms_still_gathers(runner):
    runner.configure(BatchingConfig(max_batch_size=4, wait_ms=1000.0))

    async def main() -> list[np.ndarray]:
        tasks = []
        for i in range(10):
            tasks.append(asyncio.create_task(runner.logits(row(i))))
            await asyncio.sleep(0.001)  # well within the first batch's 1 s wait
        return await asyncio.gather(*tasks)

    out = asyncio.run(main())
    assert [float(o[0, 0]) for o in out] == [float(i) for i in range(10)]
    assert runner.sizes == [4, 4, 2]


def test_a_cancelled_request_does_not_hold_the_gate(runner):
    runner.configure(BatchingConfig(max_batch_size=32, wait_ms=0.0))

    async def main() -> np.ndarray:
        runner.release.clear()
        first = asyncio.create_task(runner.logits(row(0)))
        await asyncio.sleep(0.005)
        waiting = asyncio.create_task(runner.logits(row(1)))  # held: the first batch runs
        await asyncio.sleep(0.005)
        waiting.cancel()
        runner.release.set()
        await first
        return await asyncio.wait_for(runner.logits(row(2)), 5)

    assert float(asyncio.run(main())[0, 0]) == 2.0


def test_concurrent_grpc_calls_on_the_loop_of_the_model_are_batched(runner):
    """A grpc.aio server on the event loop that runs the batched model, as a replica serves gRPC
    with Kiln's handler on its own loop (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0): 16
    concurrent calls are answered in batches of more than one."""
    runner.configure(BatchingConfig(max_batch_size=32, wait_ms=0.0))
    calls = 16

    async def handler(request: bytes, context) -> bytes:
        out = await runner.logits(row(int(request)))
        return str(int(out[0, 0])).encode()

    def client(port: int, answers: list) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/kiln.test.Batch/Infer")
            futures = [call.future(str(i).encode(), timeout=30) for i in range(calls)]
            answers.extend(int(f.result()) for f in futures)

    async def main() -> list[int]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "kiln.test.Batch", {"Infer": grpc.unary_unary_rpc_method_handler(handler)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        answers: list[int] = []
        try:
            thread = threading.Thread(target=client, args=(port, answers))
            thread.start()
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
        finally:
            await server.stop(None)
        return answers

    assert asyncio.run(main()) == list(range(calls))
    assert sum(runner.sizes) == calls
    assert max(runner.sizes) > 1 and len(runner.sizes) <= calls // 2, runner.sizes
