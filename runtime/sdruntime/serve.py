"""`sdruntime serve OUT`: an HTTP endpoint for an export on Ray Serve, on this machine or on a Ray cluster.

Two deployments. `ImageGenerator` replicas each load the export once (ONNX Runtime sessions, the NumPy
loop) and draw requests that Ray Serve's `@serve.batch` gathers, one denoiser batch (U-Net, or SD3's and Flux's
transformer) per group of requests that share a size, steps, scheduler and guidance, and for SD3 and Flux their
other prompts, T5 length, sigmas and true CFG scale (a request with an image or control images runs alone). `Api`
is the HTTP ingress: it checks requests (400 before a replica is bothered), forwards them through a bounded
queue, and turns Ray's failures into HTTP answers (503 with Retry-After when the queue is full or a replica
died, 504 past the request's time limit), so every request gets an image or an error. Ray replaces a
replica that dies. A request with `"stream": true` is answered with server-sent events, a `progress` event per
step (each image's preview through the export's tiny decoder, when it has one) and a `result` event.

Importing this module imports Ray; `sdruntime` imports it only for the serve command.
"""

import asyncio
import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile  # what Request.form() holds (FastAPI's is a subclass)
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from . import web
from .errors import InvalidArgument, UserError
from .manifest import TINY_DECODER, HashCache, controlnet_component, read_manifest
from .memory import resident_memory
from .serving import (
    DrawResult,
    ImageRequest,
    ImageStore,
    ModelFacts,
    RequestError,
    draw_batch,
    draw_stream,
    edit_body,
    embedding_files,
    error_body,
    images_body,
    lora_files,
    model_facts,
    parse_request,
    sse_event,
)

APP_NAME = "sdexport"
BATCH_WAIT_S = 0.02  # how long a replica waits for more requests to fill a batch once one has come in
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20  # requests and PNGs are small; Ray's default takes 30% of the RAM
URL_TTL_S = 600.0  # how long the ingress keeps a url request's PNGs to be fetched
URL_MAX_IMAGES = 256  # and how many at most (the oldest go first): 256 images of 512x512 take about 100 MB
# What a replica that stopped looks like from the caller: the actor died, is unreachable, or Serve cancelled
REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, RequestCancelledError)


@serve.deployment(name="ImageGenerator", health_check_period_s=2.0, health_check_timeout_s=30.0)
class ImageGenerator:
    """One replica: the export loaded once, drawing batches of requests."""

    def __init__(
        self,
        folder: str,
        provider,
        threads: int,
        verify: bool,
        max_batch: int,
        max_memory: int | None,
        lora_dir: str | None = None,
        embedding_dir: str | None = None,
    ):
        from .pipeline import StableDiffusionPipeline
        from .session import SessionSettings

        self.pipe = StableDiffusionPipeline.load(
            folder,
            provider=provider,
            settings=SessionSettings(intra_op_threads=threads),
            verify=verify,
            max_memory=max_memory,
        )
        extra = [controlnet_component(name) for name in self.pipe.export.controlnets]
        extra += [name for name in ("vae_encoder", TINY_DECODER) if self.pipe.manifest.has(name)]
        for name in extra:  # now, not at a request's first use: the memory budget's base then holds their weights
            self.pipe.component(name)
        if extra:
            self.pipe.loaded_resident = resident_memory()
        self.max_batch = max_batch
        self.loras = None if lora_dir is None else lora_files(lora_dir)  # the LoRAs requests may name
        self.embeddings = None if embedding_dir is None else embedding_files(embedding_dir)  # and embeddings
        self.drawing = asyncio.Lock()  # one drawing at a time: a batch, or a streamed request (drawn alone)
        self.draw.set_max_batch_size(max_batch)
        self.draw.set_batch_wait_timeout_s(BATCH_WAIT_S)

    def facts(self) -> ModelFacts:
        return model_facts(self.pipe, self.loras, self.embeddings)

    async def __call__(self, request: ImageRequest) -> DrawResult:
        return await self.draw(request)

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=BATCH_WAIT_S)
    async def draw(self, requests: list[ImageRequest]) -> list[DrawResult]:
        # a thread, so the replica keeps taking requests into the next batch and answering health checks
        # while ONNX Runtime (which lets go of the GIL) runs this one
        async with self.drawing:
            return await asyncio.to_thread(
                draw_batch, self.pipe, requests, self.max_batch, None, self.loras, self.embeddings
            )

    async def stream(self, request: ImageRequest):
        """A streamed request's server-sent events (serving.draw_stream), as its drawing thread emits them."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: str | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        async with self.drawing:
            drawing = asyncio.ensure_future(
                asyncio.to_thread(draw_stream, self.pipe, request, emit, self.loras, self.embeddings)
            )
            while (event := await events.get()) is not None:
                yield event
            await drawing


api = FastAPI(title="sdexport", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(
    status: int,
    message: str,
    retry_after: int | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error shape, with Retry-After where waiting helps."""
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(error_body(message, status, param, code), status, headers=headers or None)


@api.exception_handler(HTTPException)
async def http_error(http: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own answers (an unknown route, a method a route does not take) in OpenAI's error shape."""
    where = f"{http.method} {http.url.path}"
    if e.status_code == 405:
        allowed = (e.headers or {}).get("Allow", "")
        message = f"{where} is not allowed: this endpoint takes {allowed or 'another method'}"
    elif e.status_code == 404:
        message = f"Invalid URL ({where}): see GET /v1/models, POST /v1/images/generations and /v1/images/edits"
    else:
        message = f"{where}: {e.detail}"
    return error_response(e.status_code, message, headers=e.headers)


def accepts_png(accept: str | None) -> bool:
    """An `Accept` header asking for a PNG, not JSON: such a request's default response_format is png."""
    return accept is not None and "image/png" in accept and "application/json" not in accept


@serve.deployment(name="Api", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Api:
    """The HTTP ingress: checks, forwards, answers."""

    def __init__(self, generator: DeploymentHandle, timeout_s: float):
        self.generator = generator
        self.timeout_s = timeout_s
        self._facts: ModelFacts | None = None
        self._facts_call: asyncio.Future | None = None
        self.seconds_per_request = 1.0  # a running mean of answered requests' time, for Retry-After
        self.urls = ImageStore(URL_TTL_S, URL_MAX_IMAGES)  # url requests' PNGs: GET /v1/images/{id}.png

    def retry_after(self) -> int:
        return max(1, math.ceil(self.seconds_per_request))

    async def facts(self) -> ModelFacts:
        """The model's facts, asked of a replica once: a burst of first requests shares one call instead of
        filling the replicas' queue with its own."""
        if self._facts is None:
            if self._facts_call is None or self._facts_call.done():
                self._facts_call = asyncio.ensure_future(self.generator.facts.remote())
            self._facts = await asyncio.shield(self._facts_call)
        return self._facts

    @api.get("/")
    async def page(self) -> HTMLResponse:
        """The page to draw from (sdruntime/web/index.html): a form that streams /v1/images/generations."""
        return HTMLResponse(web.page(), headers={"Cache-Control": "no-cache"})

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 while at least one replica runs (503 if none), with the counts Serve reports."""
        status = await asyncio.to_thread(serve.status)
        deployment = status.applications[APP_NAME].deployments["ImageGenerator"]
        states = {str(getattr(k, "value", k)).lower(): v for k, v in deployment.replica_states.items()}
        running = states.get("running", 0)
        body = {"status": "ok" if running else "unavailable", "replicas": states}
        return JSONResponse(body, 200 if running else 503, headers=None if running else {"Retry-After": "5"})

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        try:
            facts = await asyncio.wait_for(self.facts(), self.timeout_s)
        except (asyncio.TimeoutError, *REPLICA_FAILURES, BackPressureError):
            return error_response(503, "no replica answered: the model is starting or busy", self.retry_after())
        return JSONResponse({"object": "list", "data": [facts.card()]})

    @api.get("/v1/models/{model}")
    async def model(self, model: str) -> JSONResponse:
        """The served model's card (OpenAI's model object), or 404 for any other name."""
        try:
            facts = await asyncio.wait_for(self.facts(), self.timeout_s)
        except (asyncio.TimeoutError, *REPLICA_FAILURES, BackPressureError):
            return error_response(503, "no replica answered: the model is starting or busy", self.retry_after())
        if model != facts.name:
            message = f"the model {model!r} does not exist: this server serves {facts.name!r}"
            return error_response(404, message, param="model", code="model_not_found")
        return JSONResponse(facts.card())

    @api.get("/v1/images/{key}.png")
    async def image(self, key: str) -> Response:
        """A url request's image, while the ingress keeps it (URL_TTL_S, URL_MAX_IMAGES)."""
        png = self.urls.get(key)
        if png is None:
            message = f"no image {key}.png here: a url answer's images are kept for {URL_TTL_S / 60:g} minutes"
            return error_response(404, message, code="image_not_found")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    @api.post("/v1/images/generations")
    async def generations(self, http: Request) -> Response:
        """OpenAI's images.generate: a JSON body (parse_request's fields)."""
        started = time.monotonic()
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(400, f"the body is not JSON: {e}", code="invalid_json")
        return await self.draw_answer(http, body, started)

    @api.post("/v1/images/edits")
    async def edits(self, http: Request) -> Response:
        """OpenAI's images.edit: a multipart form with the image (and a mask, OpenAI's: transparent is repainted),
        drawn as image-to-image or inpainting; or a JSON body as /v1/images/generations takes."""
        started = time.monotonic()
        kind = http.headers.get("content-type", "")
        try:
            if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
                body = json.loads(await http.body())
            else:
                form = await http.form()
                items = [(k, await v.read() if isinstance(v, UploadFile) else v) for k, v in form.multi_items()]
                body = await asyncio.to_thread(edit_body, items)  # a thread: it reads the images
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(400, f"the body is neither a multipart form nor JSON: {e}", code="invalid_json")
        except RequestError as e:
            return error_response(e.status, str(e), param=e.param, code=e.code)
        except (HTTPException, MultiPartException) as e:  # a malformed multipart body (Starlette raises either)
            detail = e.detail if isinstance(e, HTTPException) else e.message
            return error_response(400, f"the body is not a readable multipart form: {detail}")
        if isinstance(body, dict) and body.get("image") is None:
            return error_response(400, "an edit needs 'image': the picture to edit", param="image")
        return await self.draw_answer(http, body, started)

    async def draw_answer(self, http: Request, body: object, started: float) -> Response:
        """A request's body checked and drawn: its images as the response_format asks, or OpenAI's error shape."""
        try:
            facts = await asyncio.wait_for(self.facts(), self.timeout_s)
        except (asyncio.TimeoutError, *REPLICA_FAILURES, BackPressureError):
            return error_response(503, "no replica answered: the model is starting or busy", self.retry_after())
        default = "png" if accepts_png(http.headers.get("accept")) else "b64_json"
        try:
            # a thread: decoding a sent image would hold up every other request's answer
            request = await asyncio.to_thread(parse_request, body, facts, default)
        except RequestError as e:
            return error_response(e.status, str(e), param=e.param, code=e.code)
        except InvalidArgument as e:
            return error_response(400, str(e))
        if request.stream:
            return await self.stream_response(request, started)
        response = self.generator.remote(request)
        result, failed = await self.answer(response, response, started)
        if failed is not None:
            return failed
        if result.error:
            return error_response(400 if result.user_error else 500, result.error)
        self.seconds_per_request += 0.2 * (time.monotonic() - started - self.seconds_per_request)
        if request.response_format == "png":
            image = result.images[0]
            return Response(
                image.png,
                media_type="image/png",
                headers={"X-Seed": str(image.seed), "X-Batch-Images": str(image.batch_images)},
            )
        urls = None
        if request.response_format == "url":
            base = str(http.base_url).rstrip("/")
            urls = [f"{base}/v1/images/{self.urls.put(image.png)}.png" for image in result.images]
        return JSONResponse(images_body(result.images, urls))

    async def answer(self, awaitable, handle, started: float) -> tuple[object, Response | None]:
        """A replica's answer within the time left, or the error response for the queue being full (503), the time
        limit (504; `handle` is cancelled) or a replica that stopped (503)."""
        try:
            return await asyncio.wait_for(awaitable, max(self.timeout_s - (time.monotonic() - started), 0.001)), None
        except BackPressureError:
            return None, error_response(503, "the queue is full: retry later", self.retry_after())
        except asyncio.TimeoutError:
            handle.cancel()
            return None, error_response(504, f"not drawn within the server's {self.timeout_s:g} s limit: retry later")
        except REPLICA_FAILURES as e:
            message = f"the replica drawing this request stopped ({type(e).__name__}): retry; Ray replaces it"
            return None, error_response(503, message, self.retry_after())

    async def stream_response(self, request: ImageRequest, started: float) -> Response:
        """`"stream": true`: text/event-stream, a `progress` event per step and a `result` (or `error`) event.
        Until the first event comes the answers are the plain request's (503, 504); after it, a failure or the
        time limit ends the stream with an `error` event."""
        events = self.generator.options(stream=True, method_name="stream").remote(request)
        first, failed = await self.answer(events.__anext__(), events, started)
        if failed is not None:
            return failed

        async def body():
            yield first
            while True:
                try:
                    event, failed = await self.answer(events.__anext__(), events, started)
                except StopAsyncIteration:
                    return
                if failed is not None:
                    yield sse_event("error", json.loads(failed.body))
                    return
                yield event

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(
    folder: str,
    *,
    replicas: int,
    max_batch: int,
    provider,
    threads: int,
    verify: bool,
    max_queue: int,
    timeout_s: float,
    replica_cpus: float,
    max_memory: int | None = None,
    lora_dir: str | None = None,
    embedding_dir: str | None = None,
):
    """The application: the generator's replicas behind the ingress.

    A replica holds at most two batches (one drawing, one gathering); past that, up to `max_queue`
    requests wait in the ingress's queue, and the next one gets 503 at once instead of waiting forever.
    `max_memory` is each replica's memory budget (memory.py), reserved for it in Ray's scheduling too.
    `lora_dir` is the folder whose .safetensors LoRAs requests may name (serving.lora_files); None: no LoRAs.
    `embedding_dir` likewise for textual-inversion embeddings (serving.embedding_files).
    """
    actor_options: dict = {"num_cpus": replica_cpus}
    if max_memory is not None:
        actor_options["memory"] = max_memory
    generator = ImageGenerator.options(
        num_replicas=replicas,
        max_ongoing_requests=2 * max_batch,
        max_queued_requests=max_queue,
        ray_actor_options=actor_options,
    ).bind(folder, provider, threads, verify, max_batch, max_memory, lora_dir, embedding_dir)
    # the ingress takes up to what the generators can hold plus their queue at once; no limit on what waits
    # for it: Serve's proxy would answer a request past that limit 503 itself, without Retry-After, while the
    # ingress forwards or refuses (503, Retry-After) each one at once
    capacity = max_queue + 2 * max_batch * replicas + 8
    return Api.options(max_ongoing_requests=capacity, max_queued_requests=-1).bind(generator, timeout_s)


def check_export(folder: str, verify: bool = True) -> str:
    """The export's absolute path, after reading its manifest, checking its files' sha256 (unless `verify` is
    off) and that each model file reads as ONNX: a wrong or damaged folder fails here in one line, before Ray
    starts (a replica's failure would surface only in Ray's logs)."""
    from .session import check_external_data  # lazy, as the CLI's: it imports ONNX Runtime

    path = Path(folder).resolve()
    manifest = read_manifest(path)
    if verify:
        manifest.verify(cache=HashCache())
    for name in manifest.components:
        check_external_data(manifest.model_path(name))
    return str(path)


def check_port(host: str, port: int) -> None:
    """Refuse a port something else listens on, before Ray starts (Serve's proxy would fail in its logs)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port") from None


def serve_forever(
    folder: str,
    *,
    replicas: int = 1,
    max_batch: int = 4,
    host: str = "127.0.0.1",
    port: int = 8000,
    provider="cpu",
    threads: int = 0,
    verify: bool = True,
    address: str | None = None,
    max_queue: int = 64,
    timeout_s: float = 120.0,
    max_memory: int | None = None,
    lora_dir: str | None = None,
    embedding_dir: str | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Serve until SIGINT or SIGTERM. With no `address`, on a Ray instance started here and stopped after;
    with one, on that cluster, removing the application when stopped (the cluster keeps running).
    `max_memory` (bytes) is each replica's memory budget (default: what the machine has free). `lora_dir`: the
    folder of .safetensors LoRAs requests may name in `loras` (none: the field is refused); `embedding_dir` the
    folder of textual-inversion embeddings requests may name in `embeddings`."""
    folder = check_export(folder, verify)
    if lora_dir is not None:
        lora_files(lora_dir)  # a missing folder fails here in one line, before Ray starts
        lora_dir = str(Path(lora_dir).resolve())
    if embedding_dir is not None:
        embedding_files(embedding_dir)  # a missing folder fails here in one line, before Ray starts
        embedding_dir = str(Path(embedding_dir).resolve())
    local = not address
    if local:
        check_port(host, port)
        # Ray's memory monitor kills the newest retriable worker, which may be Serve's controller or the
        # ingress; without it the kernel's OOM killer takes the largest worker (Ray gives every worker
        # oom_score_adj 1000), a replica drawing, whose requests then get 503. Admission keeps it rare.
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
        cpus = os.cpu_count() or 1
        # the machine's cores shared among the replicas, so that they do not fight over them
        threads = threads or max(1, cpus // replicas)
        ray.init(
            address="local",
            num_cpus=max(cpus, replicas * threads),
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            logging_level="WARNING",
            log_to_driver=False,
        )
    else:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": timeout_s + 30})
        app = build_app(
            folder,
            replicas=replicas,
            max_batch=max_batch,
            provider=provider,
            threads=threads,
            verify=verify,
            max_queue=max_queue,
            timeout_s=timeout_s,
            replica_cpus=threads or 1,
            max_memory=max_memory,
            lora_dir=lora_dir,
            embedding_dir=embedding_dir,
        )
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"log_level": "WARNING"})
        where = "a local Ray" if local else address
        echo(
            f"serving {folder} on {where} at http://{host}:{port}/v1/images/generations "
            f"({replicas} replica{'s' if replicas > 1 else ''}, batches of up to {max_batch}); Ctrl-C stops"
        )
        echo(f"the page to draw from: http://{host}:{port}/")
        stopped = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopped.set())
        stopped.wait()
        echo("stopping")
    finally:
        stop_serving(local)


def stop_serving(local: bool, wait_s: float = 30.0) -> None:
    """Remove the application (a cluster keeps running) or shut the local Ray down. Serve's shutdown waits
    on the raylet, so it gets a deadline: a raylet already gone (killed with its process group) must not
    leave the command hanging."""
    done = threading.Thread(target=serve.shutdown if local else lambda: serve.delete(APP_NAME), daemon=True)
    done.start()
    done.join(wait_s)
    ray.shutdown()  # a local instance's processes go with it
