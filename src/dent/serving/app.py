"""The HTTP service: ``POST /predict``, ``GET /healthz``, ``GET /metrics`` (FastAPI).

No endpoint takes a path, a model or a defense from the client: what answers is fixed at start
(:mod:`dent.serving.served`). Every refusal is a JSON ``{"error": message}`` with a 4xx status; a failure of
the defense itself is a 500 whose details go to the server log only.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from dent.errors import InvalidInputError
from dent.serving.auth import authorized
from dent.serving.batcher import Answer, Batcher, QueueFull, RequestTimeout, ShuttingDown
from dent.serving.config import Isolation, ServeSection
from dent.serving.inputs import ImageSpec, RejectedInput, from_json, from_uploads
from dent.serving.isolation import metadata
from dent.serving.metrics import Metrics
from dent.serving.served import Served

log = logging.getLogger(__name__)

ENDPOINTS = ("/predict", "/healthz", "/metrics")


def error(status: int, message: str, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(served: Served, section: ServeSection, token: Optional[bytes]) -> FastAPI:
    """The service of ``served`` with ``section``'s batching and limits; ``token``: the bearer token required
    by ``/predict`` and ``/metrics`` (``None``: none). ``/healthz`` is open, and says only whether it serves."""
    metrics = Metrics(section.max_batch, lambda: batcher.depth)
    batcher = Batcher(served.predict, max_batch=section.max_batch, max_wait_s=section.max_wait_ms / 1000,
                      queue_size=section.queue_size, timeout_s=section.timeout_s,
                      mixes=section.isolation is not Isolation.CLIENT, on_batch=metrics.observe_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.close()  # after uvicorn has let the requests in flight finish

    app = FastAPI(title="dent serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def require_token(request: Request) -> None:
        if token is not None and not authorized(request.headers.get("authorization"), token):
            raise HTTPException(401, "a bearer token is required: Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=[Depends(require_token)])
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/predict", dependencies=[Depends(require_token)])
    async def predict(request: Request) -> JSONResponse:
        started = time.monotonic()
        response = await answer(request, served, batcher, section)
        metrics.latency.observe(time.monotonic() - started)
        return response

    return app


async def answer(request: Request, served: Served, batcher: Batcher, section: ServeSection) -> JSONResponse:
    """``/predict``'s response: the predictions, or the refusal."""
    try:
        images = await read_images(request, served.spec, section.max_request_bytes)
        result = await batcher.submit(images)
    except RejectedInput as exc:
        return error(exc.status, str(exc))
    except QueueFull as exc:
        return error(503, str(exc), {"Retry-After": str(exc.retry_after)})
    except ShuttingDown:
        return error(503, "the service is shutting down", {"Retry-After": "5"})
    except RequestTimeout as exc:
        return error(504, str(exc))
    except InvalidInputError as exc:  # the defense refused the batch
        return error(422, str(exc))
    except Exception:
        log.exception("predict failed")
        return error(500, "the defense failed on this request's batch; the server log has the details")
    return JSONResponse(predictions(result, served, section.isolation))


def predictions(result: Answer, served: Served, isolation: Isolation) -> dict:
    """Labels, class names and probabilities per image, with the metadata every answer carries."""
    probabilities = result.logits.softmax(dim=1)
    rows = [{"label": int(p.argmax()), "class": served.classes[int(p.argmax())], "probabilities": p.tolist()}
            for p in probabilities]
    meta = {"model": served.model_name, "defense": served.defense_kind, **metadata(isolation),
            "batch_images": result.batch_images, "batch_requests": result.batch_requests}
    return {"predictions": rows, "metadata": meta}


async def read_images(request: Request, spec: ImageSpec, max_bytes: int):
    """The request's images: a JSON array, or PNG/JPEG files in a multipart form."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/json", "multipart/form-data"):
        raise RejectedInput(f"unsupported content type {content_type or 'none'!r}: send application/json (an "
                            "array of pixel values in [0, 1]) or multipart/form-data (PNG or JPEG files)", 415)
    body = await read_body(request, max_bytes)
    if content_type == "application/json":  # parsing and decoding off the event loop
        return await run_in_threadpool(from_json, body, spec)
    return await run_in_threadpool(from_uploads, await form_files(request, body, spec), spec)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``max_bytes`` (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    too_large = RejectedInput(f"the request body exceeds {max_bytes} bytes (serve.max_request_bytes)", 413)
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def form_files(request: Request, body: bytes, spec: ImageSpec) -> list[tuple[str, bytes]]:
    """The files of a multipart body already read (and size-checked), in order; any other field is refused."""
    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=spec.max_images, max_fields=spec.max_images) as form:
            files = []
            for name, value in form.multi_items():
                if not isinstance(value, UploadFile):
                    raise RejectedInput(f"form field {name!r} is not a file: send each image as a file part")
                files.append((value.filename or name, await value.read()))
            return files
    except HTTPException as exc:  # the form parser's refusal (malformed, too many parts)
        raise RejectedInput(f"malformed multipart body: {exc.detail}", 400) from None
