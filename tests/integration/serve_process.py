"""Start a Serve process for a test (`bp-ray serve` or `serve run`), wait until it answers, stop it by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServeProcess:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 90.0, sig: int = signal.SIGTERM) -> int:
        """`sig` (SIGTERM), then SIGKILL of the process group we started if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        return self.process.returncode


def start(argv: list[str], log: Path, url: str, ready_line: str | None = None,
          timeout_s: float = 240.0) -> ServeProcess:
    """Run `argv` in its own process group; wait until GET url/healthz answers 200 and, if given, `ready_line`
    is in its output (or fail with its log)."""
    handle = log.open("w")
    process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    server = ServeProcess(url, process, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{argv[:3]} exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200 and (
                    ready_line is None or ready_line in log.read_text(errors="replace")):
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"{argv[:3]} did not answer within {timeout_s} s:\n{server.log_tail()}")
