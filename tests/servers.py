"""A real cnnkit server on 127.0.0.1 in a background thread, for the serving tests."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager


@contextmanager
def running(models, settings=None, **config):
    """Yield the base URL of a uvicorn server serving ``models`` on a free port."""
    import uvicorn

    from cnnkit.serve import UVICORN
    from cnnkit.serve.app import create_app

    app = create_app(models, settings)
    cfg = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                         **{**UVICORN, "timeout_graceful_shutdown": 5, **config})
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not (server.started and server.servers):
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
