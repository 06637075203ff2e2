"""`savpack-run serve`: classify over HTTP with a bundle (extra `savpack-runtime[serve]`: starlette, uvicorn,
prometheus_client, python-multipart; still no torch).

    from savpack_runtime.serve import ServeOptions, create_app, run_server
    app = create_app(Classifier.load("bundle/"), ServeOptions(max_batch=32))   # an ASGI app for any ASGI server

The conventions are text-embeddings-inference's: dynamic batching of concurrent requests, 413 for what is too large,
422 for invalid input (the runtime's own messages), 429 with Retry-After when the queue is full; docs/serving.md.
"""

from .app import ServeOptions, create_app
from .payload import Limits
from .server import run_server

__all__ = ["Limits", "ServeOptions", "create_app", "run_server"]
