"""What the server tests share: a tiny model, the real server on a free port, an engine held at a gate."""

import socket
import threading
import time

import httpx
import torch
import uvicorn

from longctx import GPT, GPTConfig
from longctx.infer.engine import Engine, Request

TIMEOUT = 30.0


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", n_layer=2, max_seq_len=128, init_std=0.3)).eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(TIMEOUT)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=TIMEOUT).json()

    def wait_in_flight(self, n: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.health()["in_flight"] != n:
            assert time.monotonic() < deadline, f"in_flight never reached {n}: {self.health()}"
            time.sleep(0.05)


class ControlledEngine(Engine):
    """An engine the test can hold at a gate, slow down, and watch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.step_delay = 0.0
        self.finished: list[str] = []

    def run(self, requests: list[Request]):
        assert self.gate.wait(TIMEOUT)
        for r in requests:
            poll = r.cancelled
            r.cancelled = lambda poll=poll: time.sleep(self.step_delay) or poll()  # polled once per step
        outs = super().run(requests)
        self.finished += [o.finish_reason for o in outs]
        return outs
