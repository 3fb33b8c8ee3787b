"""The real CLI in subprocesses (``python -m service ...``): a clean environment, a run
to the end, and a ``serve`` whose output (JSON log lines) goes to a file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """The parent's environment without any PRIVACY_VAULT_* leaking in, the data
    directory, the cheapest argon2, plus ``settings`` (``name=value`` for
    ``PRIVACY_VAULT_NAME``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVACY_VAULT_")}
    env |= {
        "PRIVACY_VAULT_DATA_DIR": str(data_dir),
        "PRIVACY_VAULT_ARGON2_TIME_COST": "1",
        "PRIVACY_VAULT_ARGON2_MEMORY_COST": "8",
        "PYTHONUNBUFFERED": "1",
    }
    env |= {f"PRIVACY_VAULT_{k.upper()}": v for k, v in settings.items()}
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run the CLI to its end; a run past ``timeout`` fails the test."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class ServerProcess:
    """``python -m service serve`` on ``PRIVACY_VAULT_LISTEN_ADDRESS`` of ``env``, its
    stdout and stderr (JSON log lines) in ``log_path``; or another long-running
    ``command`` (``("sidecar",)``), with the same output and ending."""

    def __init__(
        self, env: dict[str, str], cwd: Path, log_path: Path, command: tuple[str, ...] = ("serve",)
    ) -> None:
        address = env.get("PRIVACY_VAULT_LISTEN_ADDRESS", "127.0.0.1:50051")
        self.port = int(address.rsplit(":", 1)[1])
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", *command],
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        """A channel once health answers SERVING (over TLS with ``credentials``); fails
        the test if the server exits or does not answer within STARTUP_TIMEOUT."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        channel = (
            grpc.insecure_channel(self.target)
            if credentials is None
            else grpc.secure_channel(self.target, credentials)
        )
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if self.process.poll() is not None:
                channel.close()
                pytest.fail(f"the server exited ({self.process.returncode}):\n{self.log_text()}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    channel.close()
                    pytest.fail(f"the server did not start:\n{self.log_text()}")
                time.sleep(0.1)
                continue
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            return channel

    def terminate(self, timeout: float = SHUTDOWN_TIMEOUT * 3) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds it took to exit)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - started

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The log lines that are JSON, in order."""
        events = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def close(self) -> None:
        """Kill it if it still runs; close the log."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


@contextlib.contextmanager
def serving(
    tmp_path: Path,
    data_dir: Path,
    name: str,
    credentials: grpc.ChannelCredentials | None = None,
    **settings: str,
) -> Iterator[tuple[ServerProcess, grpc.Channel]]:
    """``serve`` on a free loopback port with ``settings``, its log ``<name>.log`` in
    ``tmp_path``; (the process, a channel once health says SERVING); killed after."""
    env = cli_env(data_dir, listen_address=f"127.0.0.1:{free_port()}", **settings)
    server = ServerProcess(env, tmp_path, tmp_path / f"{name}.log")
    try:
        channel = server.wait_serving(credentials)
        try:
            yield server, channel
        finally:
            channel.close()
    finally:
        server.close()
