"""A real `fastllm serve` process on 127.0.0.1 for the server tests: a tiny random Llama over the demo model's real
tokenizer (chat template included), started once per module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
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
    def __init__(self, process: subprocess.Popen, port: int, model: str, api_key: str | None, log_path: Path):
        self.process, self.port, self.model, self.api_key = process, port, model, api_key
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        """What the server printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

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
def running_server(model_dir: Path, *args: str, api_key: str | None = None, startup_s: float = 180,
                   launcher: tuple[str, ...] = ("-m", "fastllm", "serve")):
    """Start `fastllm serve model_dir *args` on a free port; yields a Server once /health answers; stops it after.
    `launcher`: what runs in place of `-m fastllm serve` (a script that patches the engine first, for fault tests)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("FASTLLM_API_KEY", None)
    command = [sys.executable, *launcher, str(model_dir), "--port", str(port),
               "--served-model-name", "tiny", *args] + (["--api-key", api_key] if api_key else [])
    # A file, not a pipe: nobody reads a pipe while the tests run, and a server that logs 64 KiB (uvicorn warns once per
    # malformed request) would block on it.
    log_file = tempfile.NamedTemporaryFile(prefix="fastllm-serve-", suffix=".log", delete=False)
    log_path = Path(log_file.name)
    process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(process, port, "tiny", api_key, log_path)
    try:
        deadline = time.monotonic() + startup_s
        while not server.healthy():
            if process.poll() is not None:
                raise RuntimeError(f"fastllm serve exited with {process.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fastllm serve did not answer /health in time:\n{server.log()}")
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log_file.close()
        log_path.unlink(missing_ok=True)
