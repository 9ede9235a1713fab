"""Running the service: the token, the model and defense, then uvicorn until a signal stops it.

On SIGINT or SIGTERM uvicorn stops listening, lets the requests in flight finish (up to ``timeout_s``, the
longest a request can take), then the app's shutdown answers whatever is still queued (:meth:`Batcher.close`).
"""

from __future__ import annotations

import logging
import math

import uvicorn
from fastapi import FastAPI

from dent.serving.app import create_app
from dent.serving.auth import read_token
from dent.serving.config import Isolation, ServeConfig, ServeSection
from dent.serving.isolation import GUARANTEES, SHARED_WARNING
from dent.serving.served import load_served

log = logging.getLogger(__name__)


def run_server(cfg: ServeConfig) -> None:
    """Serve ``cfg`` until interrupted."""
    section = cfg.serve
    token = read_token(section)  # first: a missing token fails before the model loads
    served = load_served(cfg)
    app = create_app(served, section, token)
    print(f"dent serve: {served.model_name} with defense {served.defense_kind} on {served.device}, isolation "
          f"{section.isolation.value} ({GUARANTEES[section.isolation]}); "
          f"{'bearer token required' if token else 'no token'}; http://{section.host}:{section.port}/predict",
          flush=True)
    if section.isolation is Isolation.SHARED:
        log.warning(SHARED_WARNING)
    uvicorn_server(app, section).run()


def uvicorn_server(app: FastAPI, section: ServeSection, log_level: str = "info") -> uvicorn.Server:
    """uvicorn serving ``app`` on ``section``'s address; a shutdown waits for requests in flight as long as one
    may take (``timeout_s``)."""
    return uvicorn.Server(uvicorn.Config(app, host=section.host, port=section.port, log_level=log_level,
                                         timeout_graceful_shutdown=math.ceil(section.timeout_s) + 1))
