"""What the API port answers while the job is not running (shardline/supervise.py serves it).

A board that lost power or its cable ends the job; until it answers again, the supervisor keeps the
port that rank 0 serves answering: every request gets a fast 503 with Retry-After and an
OpenAI-shaped error naming the unreachable board(s), and `GET /health` says the same. Rank 0 takes
the port back when the job is up again. A FastAPI app like rank 0's, run by uvicorn in a thread, so
that clients see the same error shape from both; it imports neither torch nor the engine.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


@dataclass
class Down:
    """Why the job is not running: a message for people, the boards that do not answer (name, address,
    what ssh said), when the supervisor tries again (time.monotonic())."""
    message: str
    code: str                        # "boards_unreachable" or "job_restarting"
    retry_at: float
    unreachable: list[dict] = field(default_factory=list)

    def retry_after(self) -> int:
        return max(1, math.ceil(self.retry_at - time.monotonic()))


def create_app(state: Callable[[], Down]):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title="shardline (unavailable)", openapi_url=None, docs_url=None, redoc_url=None)

    def reply(body: dict, down: Down) -> JSONResponse:
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(down.retry_after())})

    @app.get("/health")
    async def health():
        down = state()
        return reply({"status": "unavailable", "error": down.message, "code": down.code,
                      "unreachable": down.unreachable, "retry_after_s": down.retry_after()}, down)

    @app.api_route("/{path:path}", methods=METHODS)
    async def everything(path: str):
        down = state()
        return reply({"error": {"message": down.message, "type": "service_unavailable", "param": None,
                                "code": down.code},
                      "unreachable": down.unreachable}, down)

    return app


class Responder:
    """Serves create_app on host:port in a thread while shown; hide() frees the port for rank 0."""

    def __init__(self, host: str, port: int, log):
        self.host, self.port, self.log = host, port, log
        self.down: Down | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    def show(self, down: Down, wait_for_port: float = 0.0) -> None:
        """Answer `down` on the port. A rank 0 just killed may hold it for a moment (its first thread
        is a zombie, which is what the supervisor watches, while the others still close its files:
        measured up to 2 s on a loaded machine): the supervisor then waits up to wait_for_port seconds."""
        self.down = down
        if self._thread is not None and self._thread.is_alive():
            return
        from shardline import bound_socket
        sock, err = bound_socket(self.host, self.port, wait_for_port)
        if sock is None:   # the port is still taken (a rank 0 on its way out): next time
            self.log(f"cannot answer on {self.host}:{self.port} yet ({err}); trying again at the next check")
            return
        import uvicorn
        self._server = uvicorn.Server(uvicorn.Config(create_app(lambda: self.down), host=self.host, port=self.port,
                                                     log_level="error", timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="unavailable",
                                        daemon=True)
        self._thread.start()
        for _ in range(100):
            if self._server.started or not self._thread.is_alive():
                break
            time.sleep(0.02)

    @property
    def shown(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def hide(self) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._thread = self._server = None
