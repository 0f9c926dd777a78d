"""A real `fastllm serve` process on 127.0.0.1 for the server tests: a tiny random Llama over the demo model's real
tokenizer (chat template included), started once per module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def tiny_model_dir(path: Path) -> Path:
    """A tiny random Llama with the demo tokenizer saved beside it (what `fastllm serve PATH` loads)."""
    from tests._models import build_over_demo_tokenizer

    tokenizer, path = build_over_demo_tokenizer(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, port: int, model: str, api_key: str | None):
        self.process, self.port, self.model, self.api_key = process, port, model, api_key
        self.url = f"http://127.0.0.1:{port}"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str) -> float:
        """A gauge or counter from /metrics (the sum over its labels)."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers(), timeout=5).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name) and not line.startswith("#")]
        return sum(values)


@contextmanager
def running_server(model_dir: Path, *args: str, api_key: str | None = None, startup_s: float = 180):
    """Start `fastllm serve model_dir *args` on a free port; yields a Server once /health answers; stops it after."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("FASTLLM_API_KEY", None)
    command = [sys.executable, "-m", "fastllm", "serve", str(model_dir), "--port", str(port),
               "--served-model-name", "tiny", *args] + (["--api-key", api_key] if api_key else [])
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(process, port, "tiny", api_key)
    try:
        deadline = time.monotonic() + startup_s
        while not server.healthy():
            if process.poll() is not None:
                raise RuntimeError(f"fastllm serve exited with {process.returncode}:\n{process.stdout.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError("fastllm serve did not answer /health in time")
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
