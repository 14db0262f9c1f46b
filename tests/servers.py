"""A real ``bayesretrieval serve`` process on a loopback port, and plain-HTTP calls to it."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from bayesretrieval.indexing import BuildConfig, build_index
from bayesretrieval.options import SERVE_TOKEN_ENV


@dataclass
class Served:
    """A started server: its base URL, and its output once it has stopped."""

    base: str
    process: subprocess.Popen
    out: str = ""
    err: str = ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(url, body=None, timeout=30, token=None):
    """``(status, JSON answer)`` of a GET, or of a POST of ``body`` as JSON."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as response:
        return response.status, json.loads(response.read())


@contextlib.contextmanager
def running_server(index, *options: str, token: str | None = None, startup_s: float = 120):
    """``bayesretrieval serve INDEX`` on a free loopback port, stopped (SIGTERM) on exit.

    ``index`` is one index directory or a list of them (served as shards). Yields once
    ``/api/health`` answers; the :class:`Served` has the process's stdout and stderr
    after the block.
    """
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(SERVE_TOKEN_ENV, None)
    if token:
        env[SERVE_TOKEN_ENV] = token
    index_dirs = index if isinstance(index, (list, tuple)) else [index]
    command = [sys.executable, "-m", "bayesretrieval.cli", "serve", *map(str, index_dirs), "--port", str(port),
               "--torch-threads", "1", *options]
    served = Served(f"http://127.0.0.1:{port}", subprocess.Popen(command, stdout=subprocess.PIPE,
                                                                  stderr=subprocess.PIPE, text=True, env=env))
    try:
        deadline = time.monotonic() + startup_s
        while True:
            assert served.process.poll() is None, served.process.communicate()[1][-3000:]
            try:
                if http(f"{served.base}/api/health", timeout=2) == (200, {"status": "ok"}):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"the server did not answer within {startup_s} s"
            time.sleep(0.2)
        yield served
    finally:
        served.process.terminate()
        served.out, served.err = served.process.communicate(timeout=30)


def build(source, index, encoder, posterior):
    """Index a small test folder in this process (small batches, no decode workers)."""
    return build_index(source, index, encoder, posterior, BuildConfig(batch_size=4, workers=0))
