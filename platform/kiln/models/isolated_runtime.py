"""A model's runtime in its own child process: a crash of the model takes only that process.

Serving runs a rollout's candidate this way (``kiln.serve.model_server``): a version that aborts
its process (an ONNX Runtime abort, a builder's bug, an out-of-memory kill) fails the requests it
was answering, while the versions that run in the replica's own process go on answering theirs.

The parent holds the torch-free spec (preprocessing, labels, shapes) and a socket to the child; the
child (``python -m kiln.models.isolated_runtime DIRECTORY FD``) loads the runtime and answers one
call at a time. Messages are ``multiprocessing.connection`` frames of a JSON header and raw float32
bytes, never pickles. A call that finds the child gone raises ``RuntimeProcessDied`` with how it
ended (say, ``killed by SIGABRT``); the child exits when the parent closes the socket or dies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ModelError, first_line
from kiln.models.spec import ModelSpec, check_allowed_builder

HEADER = struct.Struct("<I")  # the JSON header's length, before the header and the array's bytes
READY_TIMEOUT_S = 300.0  # loading a large model in a busy child may take minutes


class RuntimeProcessDied(ModelError):
    """The child process running a model's runtime is gone (crashed, killed, or closed)."""


def _frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return HEADER.pack(len(head)) + head + payload


def _unframe(frame: bytes) -> tuple[dict[str, Any], memoryview]:
    (size,) = HEADER.unpack_from(frame, 0)
    header = json.loads(frame[HEADER.size : HEADER.size + size])
    return header, memoryview(frame)[HEADER.size + size :]


def _array(header: dict[str, Any], payload: memoryview) -> np.ndarray:
    return np.frombuffer(payload, dtype=np.float32).reshape(header["shape"])


def exit_cause(returncode: int | None) -> str:
    """How a child process ended, in words: ``killed by SIGABRT``, ``exited with 1``, ..."""
    if returncode is None:
        return "closed its connection"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with {returncode}"


class IsolatedRuntime:
    """A ``Runtime`` (``fn(x) -> logits``) whose model runs in a child process. ``close()`` ends
    it. Calls are serialized (one model call at a time, like a version's runner thread)."""

    def __init__(self, directory: Path, spec: ModelSpec, source: str):
        check_allowed_builder(spec, source)  # refused here, before a process imports anything
        self.source = source
        parent, child = socket.socketpair()
        # The child finds the modules this process imports (Kiln, allowed builders) where it does.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        torch = sys.modules.get("torch")  # not imported here for it: only read when loaded
        if torch is not None and "OMP_NUM_THREADS" not in env:
            # as many intra-op threads as this process's models use (serve.deployment.threads),
            # not one per core competing with them
            env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kiln.models.isolated_runtime",
                    str(directory),
                    str(child.fileno()),
                ],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        self._lock = threading.Lock()
        self.died: str | None = None  # how the child ended, once a call found it gone
        try:
            if not self._conn.poll(READY_TIMEOUT_S):
                raise ModelError(f"{source}: its process did not load it in {READY_TIMEOUT_S:g}s")
            header, _ = _unframe(self._receive())
        except BaseException:
            self.close()
            raise
        if "error" in header:
            self.close()
            raise ModelError(f"{source}: {header['error']}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        with self._lock:
            if self.died is not None:
                raise RuntimeProcessDied(f"{self.source}: its process {self.died}")
            try:
                self._conn.send_bytes(_frame({"shape": list(x.shape)}, x.tobytes()))
            except OSError:
                self._receive()  # raises RuntimeProcessDied with the cause
            header, payload = _unframe(self._receive())
        if "error" in header:  # the model raised: the child goes on
            raise ModelError(f"{self.source}: {header['error']}")
        return _array(header, payload).copy()

    def _receive(self) -> bytes:
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError):
            try:
                code = self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # it closed the socket but lives: end it
                self._proc.kill()
                code = self._proc.wait()
            self.died = exit_cause(code)
            raise RuntimeProcessDied(f"{self.source}: its process {self.died}") from None

    def close(self) -> None:
        """End the child (it exits on the closed socket; killed if it does not within 5 s)."""
        self._conn.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _serve(directory: str, fd: int) -> int:
    """The child: load the runtime, say ready (or why not), then answer calls until EOF."""
    from kiln.models.inference_runtime import make_runtime
    from kiln.models.spec import load_spec

    conn = Connection(fd)
    try:
        spec = load_spec(directory)
        runtime = make_runtime(Path(directory), spec)
    except Exception as exc:  # reported to the parent, which raises it as the load's error
        conn.send_bytes(_frame({"error": f"{type(exc).__name__}: {first_line(exc, 300)}"}))
        return 1
    conn.send_bytes(_frame({"ready": True}))
    while True:
        try:
            header, payload = _unframe(conn.recv_bytes())
        except EOFError:  # the parent closed the socket or died
            return 0
        try:
            x = _array(header, payload).copy()  # writable: runtimes may hand it to torch as is
            out = np.ascontiguousarray(runtime(x), dtype=np.float32)
        except Exception as exc:  # the model's error for this input: answered, the child goes on
            conn.send_bytes(_frame({"error": f"{type(exc).__name__}: {first_line(exc, 300)}"}))
            continue
        conn.send_bytes(_frame({"shape": list(out.shape)}, out.tobytes()))


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1], int(sys.argv[2])))
