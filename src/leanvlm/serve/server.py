"""`leanvlm serve MODEL_DIR`: load a saved model, start its engine and serve the OpenAI-compatible app with uvicorn;
and `running_server`, the same server on a thread, for tests and the load test."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from leanvlm.eval.exact_match import load_model
from leanvlm.inference.engine import Engine
from leanvlm.inference.runner import EngineRunner
from leanvlm.serve.app import create_app
from leanvlm.serve.images import ImageSources


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # default: the model directory's name
    api_key: str | None = None
    dtype: str | None = None  # e.g. "bfloat16"; default: as saved
    max_batch_size: int = 16
    max_prefill_tokens: int = 4096
    max_waiting: int = 64
    image_cache_mb: float = 1024
    max_images: int = 4
    max_body_bytes: int = 32 << 20
    default_max_tokens: int = 256
    images: ImageSources = field(default_factory=ImageSources)


def build_app(model_dir: str, settings: ServerSettings, model=None, processor=None):
    """The app for a saved model (or for `model` + `processor` already loaded)."""
    if model is None:
        model, processor = load_model(model_dir)
    if settings.dtype:
        model = model.to(getattr(torch, settings.dtype))
    name = settings.model_name or os.path.basename(os.path.normpath(model_dir))
    engine = Engine(model, processor, max_batch_size=settings.max_batch_size,
                    max_prefill_tokens=settings.max_prefill_tokens,
                    image_cache_bytes=int(settings.image_cache_mb * (1 << 20)), model_id=name,
                    default_max_tokens=settings.default_max_tokens)
    runner = EngineRunner(engine, settings.max_waiting)
    return create_app(runner, name, api_key=settings.api_key, max_images=settings.max_images,
                      max_body_bytes=settings.max_body_bytes,
                      image_sources=settings.images)


def serve(model_dir: str, settings: ServerSettings) -> None:
    import uvicorn

    uvicorn.run(build_app(model_dir, settings), host=settings.host, port=settings.port, log_level="info")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, host: str = "127.0.0.1", start_timeout: float = 60.0):
    """Serve `app` with uvicorn on a thread, on a free loopback port; yields the base URL and stops the server on
    exit."""
    import uvicorn

    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="leanvlm-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"The server did not start on {host}:{port}.")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
