"""Run the service with uvicorn on a socket bound here (so port 0 works and the real address is printed), and drain
on SIGTERM or Ctrl-C: uvicorn stops accepting connections, lets requests in flight finish (at most
`graceful_seconds`), then the app's lifespan stops the batcher."""

from __future__ import annotations

import socket
import sys

import uvicorn

from ..classifier import Classifier
from ..errors import SavpackError
from .app import ServeOptions, create_app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise SavpackError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run_server(classifier: Classifier, options: ServeOptions, host: str = "127.0.0.1", port: int = 8080,
               log_level: str = "info", access_log: bool = True, graceful_seconds: int = 30) -> None:
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    app = create_app(classifier, options)
    config = uvicorn.Config(app, host=bound_host, port=bound_port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=graceful_seconds, lifespan="on", server_header=False)
    packs = ", ".join(classifier.pack_names)
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"savpack-run serve: {classifier.bundle.folder} ({classifier.bundle.model['id']}; packs {packs}) on "
          f"http://{url_host}:{bound_port}/ (max batch {options.max_batch}, max wait {options.max_wait_ms:g} ms, "
          f"max queue {options.max_queue})", file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[sock])
