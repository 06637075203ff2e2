"""A real `savpack-run serve` for tests: uvicorn on 127.0.0.1 and a free port, in a background thread, stopped after.

    with running_server(golden.bundle_dir("qwen2"), max_batch=8) as url:
        httpx.post(f"{url}/v1/classify", json={"inputs": ["a circle"]})
"""

from __future__ import annotations

import base64
import re
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import uvicorn

from savpack_runtime.classifier import Classifier
from savpack_runtime.serve import Limits, ServeOptions, create_app
from savpack_runtime.serve.server import bind

START_SECONDS = 30


@lru_cache(maxsize=None)
def classifier(bundle: Path) -> Classifier:
    """One loaded Classifier per bundle for the whole test run (loading opens an onnxruntime session)."""
    return Classifier.load(bundle, threads=1)


@contextmanager
def running_server(bundle: Path, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256, **limits: Any) -> Iterator[str]:
    options = ServeOptions(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, limits=Limits(**limits))
    app = create_app(classifier(Path(bundle)), options)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + START_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server on port {port} did not start within {START_SECONDS} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(START_SECONDS)
        sock.close()


def data_url(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def b64(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in /metrics text (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match and all(f'{key}="{value}"' in (match.group(1) or "") for key, value in labels.items()):
            return float(match.group(2))
    return 0.0
