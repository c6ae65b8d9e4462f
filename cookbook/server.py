"""A minimal HTTP front end for `cookbook.live.LiveEngine`: FastAPI + uvicorn on loopback only.

    live = LiveEngine(model, Policy("continuous", 8)).start()
    with BackgroundServer(create_app(live, tokenizer)) as server:   # 127.0.0.1, a free port
        httpx.post(server.url + "/generate", json={"prompt": "To be", "max_new_tokens": 8})

POST /generate takes {"prompt": text} or {"prompt_ids": [...]}, "max_new_tokens" and "priority"
("high" or "low"); it answers the new token ids, their text and the request's timings. A request
the engine cannot serve gets HTTP 400 with the reason (FastAPI answers 422 for wrong JSON types); when the engine
holds `max_in_flight` requests already, HTTP 503 with a Retry-After header (seconds) instead of an unbounded queue;
504 when a request outlives the engine's `request_timeout_s`, 503 when the engine has stopped or failed.
"""

import math
import socket
import threading
import time

from .errors import require_module
from .live import LiveEngine, Overloaded
from .serving import PRIORITY_NAMES

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def create_app(live: LiveEngine, tokenizer):
    """The FastAPI app: POST /generate, GET /health.

    (No `from __future__ import annotations` in this file: FastAPI must see the request model as a class.)
    """
    fastapi = require_module("fastapi", purpose="the HTTP front end")
    pydantic = require_module("pydantic", purpose="the HTTP front end")
    from fastapi.concurrency import run_in_threadpool

    class GenerateRequest(pydantic.BaseModel):
        prompt: str | None = None
        prompt_ids: list[int] | None = None
        max_new_tokens: int = 16
        priority: str = "low"

    app = fastapi.FastAPI(title="cookbook serving demo")

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "completed": live.completed}

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> dict:
        if (req.prompt is None) == (req.prompt_ids is None):
            raise fastapi.HTTPException(400, "Send exactly one of 'prompt' (text) or 'prompt_ids' (token ids).")
        if req.priority not in PRIORITY_NAMES:
            raise fastapi.HTTPException(400, f"priority must be one of {sorted(PRIORITY_NAMES)}, got {req.priority!r}.")
        ids = req.prompt_ids if req.prompt_ids is not None else tokenizer(req.prompt).input_ids  # BOS added
        try:  # the engine call blocks, so it runs in a worker thread, not on the event loop
            seq = await run_in_threadpool(live.submit, ids, req.max_new_tokens, PRIORITY_NAMES[req.priority])
        except ValueError as exc:
            raise fastapi.HTTPException(400, str(exc)) from None
        except Overloaded as exc:
            raise fastapi.HTTPException(503, str(exc), headers={"Retry-After": str(math.ceil(exc.retry_after_s))}) from None
        except TimeoutError as exc:
            raise fastapi.HTTPException(504, str(exc)) from None
        except RuntimeError as exc:  # the engine stopped or failed: nothing this request can fix
            raise fastapi.HTTPException(503, str(exc)) from None
        r = seq.request
        return {
            "token_ids": seq.output,
            "text": tokenizer.decode(seq.output, skip_special_tokens=True),
            "prompt_tokens": len(r.prompt_ids),
            "queue_s": seq.admitted_s - r.arrival_s,
            "ttft_s": seq.first_token_s - r.arrival_s,
            "latency_s": seq.finished_s - r.arrival_s,
            "preemptions": seq.preemptions,
        }

    return app


class BackgroundServer:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; `stop()` (or leaving `with`) shuts it down."""

    def __init__(self, app, port: int | None = None, host: str = LOOPBACK) -> None:
        if host not in (LOOPBACK, "localhost", "::1"):
            raise ValueError(f"This demo server binds to loopback only (127.0.0.1), not {host!r}.")
        uvicorn = require_module("uvicorn", purpose="the HTTP front end")
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="cookbook-uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url} within {timeout} s.")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
