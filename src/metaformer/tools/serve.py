"""``metaformer serve``: a classifier behind an HTTP API and a web page (FastAPI + uvicorn).

* ``POST /predict``: an image as a multipart upload (field ``file``), a raw ``image/*`` body, or JSON
  ``{"image": BASE64}``; ``?topk=5&cam=1``. Answers the top-k labels and scores, and with ``cam=1`` a
  Grad-CAM overlay of the top class (PNG data URL) or the one-line reason it is unavailable.
* ``GET /health``, ``GET /info`` (model, classes, input size, backend, batching, limits).
* ``GET /``: the page (drop or choose an image; top-5 bars; the CAM overlay).

Concurrent requests are batched: a bounded queue (a full queue answers 503 at once) and one worker
that takes up to ``max_batch`` waiting images, waiting after the first at most ``max_wait_ms`` (and no
longer than recent batches took to run) while other requests are still being read and decoded (a lone
request never waits), and runs them as one batch on one thread.

Uploads are decoded by the readers' own decoder (:func:`metaformer.data.images.open_rgb`: EXIF orientation
applied, 16-bit and float images scaled), restricted to the formats of
:data:`~metaformer.data.images.UPLOAD_FORMATS`, at most ``max_decodes`` at a time. Bad input is a 4xx with a
one-line ``{"error": ...}`` and one line in the log: not an image (400), too large (413, body over
``max_bytes``), a decompression bomb (413, more pixels than ``max_pixels``), a content type that is not an
image or an image format not accepted (415), a request whose headers or body stall (408, see
:class:`Limits`). A client that leaves mid-body is one log line, not a traceback.
"""

import asyncio
import base64
import binascii
import contextlib
import copy
import io
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import MetaFormerError, require
from ..engine.metrics import ranked
from .cam import cam_stage_for

PAGE = Path(__file__).with_name("serve.html")
EXPORT_SUFFIXES = (".onnx", ".pt", ".pt2", ".xml")
log = logging.getLogger("metaformer.serve")


class ServeError(MetaFormerError):
    """A model that cannot be served as asked."""


class BadInput(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line reason; ``close``: the body was not read to
    its end, so the connection is closed after the answer instead of reading what the client still sends."""

    def __init__(self, status: int, reason: str, close: bool = False):
        super().__init__(reason)
        self.status, self.reason, self.close = status, reason, close


# ----------------------------------------------------------------------------- the model
@dataclass
class Servable:
    """What the server runs: ``predict(images [B, C, H, W]) -> logits``, the preprocessing, and the plain
    PyTorch model for Grad-CAM when there is one (else ``cam_note`` says why not)."""

    predict: Callable[[torch.Tensor], torch.Tensor]
    transform: Callable
    class_names: list[str]
    img_size: int
    source: str
    variant: str | None
    backend: str
    cam_model: torch.nn.Module | None = None
    cam_stage: int | None = None
    cam_note: str | None = None
    quantization: dict | None = None
    extra: dict = field(default_factory=dict)


def load_servable(source: str, model_name: str | None = None, fused: bool = True, cam: bool = True) -> Servable:
    """A checkpoint (any layout metaformer loads; ours name their model) run in PyTorch, fused when the model
    has blocks :func:`metaformer.fuse` covers, or an exported file (ONNX, int8 ONNX, TorchScript, .pt2, OpenVINO
    IR) run in its own runtime."""
    if source.endswith(EXPORT_SUFFIXES):
        from .exported import load_exported

        loaded = load_exported(source, model_name)
        run = loaded.model
        quant = run.quantization
        backend = {"onnx": "ONNX Runtime", "torchscript": "TorchScript", "exported": "torch.export",
                   "openvino": "OpenVINO"}[run.format]
        backend += f" int8 ({quant['backend']})" if quant else ""
        note = ("Grad-CAM needs the PyTorch model's gradients, which an exported file does not have"
                + (" (int8)" if quant else "") + ": serve the checkpoint to see where the model looked")
        return Servable(run, loaded.transform, loaded.class_names, loaded.img_size, str(source), loaded.variant,
                        backend, cam_note=note, quantization=quant)
    from ..tasks.inference import load_for_inference, prepare

    loaded = load_for_inference(model_name, source, device="cpu")
    plain = copy.deepcopy(loaded.model) if cam else None
    applied = prepare(loaded, torch.device("cpu"), fused=fused)
    model = loaded.model
    backend = "PyTorch fp32" + (" fused" if applied and applied[0].startswith("fused") else "")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    stage, note = cam_stage_for(plain) if plain is not None else (None, "Grad-CAM is off (--no-cam)")
    if plain is not None and not hasattr(plain, "stages"):
        plain, stage, note = None, None, "this model has no stages for Grad-CAM"
    return Servable(run, loaded.transform, loaded.class_names, loaded.img_size, str(source), loaded.variant,
                    backend, cam_model=plain, cam_stage=stage, cam_note=note, extra={"applied": applied})


# ----------------------------------------------------------------------------- decoding
def decode_image(data: bytes, max_pixels: int):
    """Upright 8-bit RGB from a client's bytes, decoded as every other reader decodes files
    (:func:`metaformer.data.images.open_rgb`) but only from the accepted formats; :class:`BadInput` for what is
    not an image (400), would decode too large (413) or is in another format (415)."""
    from ..data.images import UPLOAD_FORMATS, DataError, FormatRefused, TooManyPixels, open_rgb

    if not data:
        raise BadInput(400, "empty body: send an image")
    try:
        return open_rgb(data, "upload", max_pixels=max_pixels, formats=UPLOAD_FORMATS)
    except TooManyPixels as e:
        raise BadInput(413, f"decompression bomb refused: {e}") from None
    except FormatRefused as e:
        raise BadInput(415, str(e)) from None
    except DataError as e:
        raise BadInput(400, str(e)) from None


def png_data_url(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------- batching
class QueueFull(Exception):
    pass


class Batcher:
    """Dynamic batching: requests wait in a bounded queue; one loop takes up to ``max_batch`` of them, waiting at
    most ``max_wait_ms`` after the first for more, and runs the batch on one worker thread."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 256):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ServeError("--max-batch and --max-queue must be at least 1, --max-wait-ms at least 0")
        self.fn, self.max_batch, self.max_wait, self.max_queue = fn, max_batch, max_wait_ms / 1e3, max_queue
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metaformer-model")
        self.batches = 0
        self.images = 0
        self.arriving = 0  # requests being read and decoded, not yet queued
        self.call_s = self.max_wait  # running mean of a batch's model time (starts at the longest wait)
        self._full: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self._full = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def submit(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The model's probabilities for one preprocessed image ``[C, H, W]``, and the size of its batch."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((x, future))
        except asyncio.QueueFull:
            raise QueueFull() from None
        if self.queue.qsize() >= self.max_batch - 1:  # the batch being collected holds one more
            self._full.set()
        return await future

    @contextlib.contextmanager
    def incoming(self):
        """Around a request's reading and decoding: while some are on their way, a batch waits for them (up
        to ``max_wait_ms``); a lone request is never held back."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            if self.arriving == 0 and self._full is not None:
                self._full.set()  # nothing more is on its way: stop waiting

    async def _collect(self) -> list:
        batch = [await self.queue.get()]
        # Waiting for more pays only when the model's call costs more than the wait: never longer than the
        # last batches took to run (a 1 ms int8 call is not held 5 ms), and only while requests are on their way.
        wait = min(self.max_wait, self.call_s)
        if wait > 0 and self.arriving > 0 and self.queue.qsize() < self.max_batch - 1:
            # one timed wait per batch, cut short once a full batch is waiting or nothing more is coming
            self._full.clear()
            try:
                await asyncio.wait_for(self._full.wait(), wait)
            except asyncio.TimeoutError:
                pass
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x).float().softmax(dim=1)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(x, f) for x, f in batch if not f.done()]  # a client that left needs no answer
            if not live:
                continue
            try:
                t0 = time.perf_counter()
                probs = await loop.run_in_executor(self.executor, self._run, torch.stack([x for x, _ in live]))
                self.call_s = 0.8 * self.call_s + 0.2 * (time.perf_counter() - t0)
            except Exception as e:  # a failed batch fails its requests, never the loop
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            self.images += len(live)
            for (_, f), p in zip(live, probs):
                if not f.done():
                    f.set_result((p, len(live)))


def warm_up(servable: Servable) -> None:
    servable.predict(torch.zeros(1, 3, servable.img_size, servable.img_size))
    if servable.cam_model is not None:
        require("pytorch_grad_cam", "cam", "Grad-CAM in metaformer serve (or pass --no-cam)")


# ----------------------------------------------------------------------------- the app
@dataclass
class Limits:
    """What one request may cost the server.

    ``read_timeout``: seconds a request's headers may take to arrive (from the connection's start, or from the
    previous answer on a kept-alive connection), and a body's first allowance, which every ``min_rate`` bytes
    received extend by one more second: a body trickled in a byte at a time is cut off, a large upload on a
    slow link is not (the rule of Apache's mod_reqtimeout). Either answers 408 and closes the connection.
    ``max_decodes``: images decoded at once, on as many threads of their own; each holds its decoded pixels
    and one upright RGB copy while it is turned into the model's input (240 MB for a 40 M pixel upload), so
    this bounds the memory a burst of large uploads takes, and what the allocator keeps of it (glibc gives
    each thread its own heap: decoding on any of the request thread pool's 40 threads could leave a freed
    burst in each).
    """

    max_bytes: int = 10 * 2 ** 20  # request body
    max_pixels: int = 40_000_000  # decoded image (PIL's own warning starts at ~89M)
    max_topk: int = 100
    read_timeout: float = 20.0
    min_rate: float = 500.0  # bytes/s
    max_decodes: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))

    def __post_init__(self):
        if not (self.read_timeout > 0 and self.min_rate > 0 and self.max_decodes >= 1):
            raise ServeError("read_timeout and min_rate must be > 0 and max_decodes at least 1")


# Once no request has been in flight for TRIM_IDLE_S seconds and the process grew by more than TRIM_SLACK bytes
# since the last time, its free heap pages go back to the OS: the freed memory of a burst (decoded images, a
# large batch's activations) stays in glibc's heaps otherwise. Only when idle, so a loaded server keeps reusing
# its working set instead of faulting it in again.
TRIM_IDLE_S = 1.0
TRIM_SLACK = 64 * 2 ** 20


def one_line(reason: str) -> str:
    return " ".join(str(reason).split())


def create_app(servable: Servable, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256,
               limits: Limits | None = None):
    """The FastAPI application serving ``servable`` (see the module docstring). ``app.state.limits`` holds the
    limits, which :func:`server_config` reads for the header timeout."""
    fastapi = require("fastapi", "serve", "metaformer serve")
    require("multipart", "serve", "metaformer serve (multipart uploads)")
    from contextlib import asynccontextmanager

    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect

    from ..fast.alloc import release_freed_memory, resident_bytes

    limits = limits or Limits()
    batcher = Batcher(servable.predict, max_batch, max_wait_ms, max_queue)
    cam_lock = threading.Lock()  # Grad-CAM hooks the model: one at a time
    decoder = ThreadPoolExecutor(max_workers=limits.max_decodes, thread_name_prefix="metaformer-decode")
    memory = {"in_flight": 0, "rest": None, "trimming": False, "timer": None}
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        # the first call packs weights, allocates and imports Grad-CAM: done here, not in a client's request
        await run_in_threadpool(warm_up, servable)
        memory["rest"] = resident_bytes()
        batcher.start()
        yield
        await batcher.stop()
        decoder.shutdown(wait=True)

    app = fastapi.FastAPI(title="metaformer serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)

    def error(status: int, reason: str, headers: dict | None = None):
        return JSONResponse({"error": one_line(reason)}, status_code=status, headers=headers)

    def who(request) -> str:
        client = request.client
        return f"{client.host}:{client.port}" if client else "unknown client"

    def refuse(request, status: int, reason: str, headers: dict | None = None):
        """The answer to a bad request, and its one line in the log."""
        log.warning("%d %s %s from %s: %s", status, request.method, request.url.path, who(request), one_line(reason))
        return error(status, reason, headers)

    @app.exception_handler(BadInput)
    async def _bad_input(request, exc: BadInput):
        return refuse(request, exc.status, exc.reason, {"connection": "close"} if exc.close else None)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request, exc):
        log.warning("%s %s from %s: the client left before its request had arrived%s", request.method,
                    request.url.path, who(request), f" ({exc})" if str(exc) else "")
        return Response(status_code=400)  # nobody reads it: the connection is gone

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
        return refuse(request, 422, f"invalid {where or 'request'}: {first.get('msg', 'bad value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return refuse(request, exc.status_code, str(exc.detail))

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise BadInput(413, f"request too large: {int(declared):,} bytes, over the limit of "
                                f"{limits.max_bytes:,}", close=True)
        loop = asyncio.get_running_loop()
        chunks, size, start = [], 0, loop.time()
        of = f" of {int(declared):,}" if declared and declared.isdigit() else ""
        while True:
            allowed = limits.read_timeout + size / limits.min_rate
            try:
                message = await asyncio.wait_for(request.receive(), max(0.0, start + allowed - loop.time()))
            except asyncio.TimeoutError:
                raise BadInput(408, f"request body too slow: {size:,}{of} bytes in {loop.time() - start:.1f} s "
                                    f"(allowed: {limits.read_timeout:g} s, plus 1 s per {limits.min_rate:g} bytes)",
                               close=True) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect(f"{size:,}{of} bytes of its body received")
            size += len(message.get("body", b""))
            if size > limits.max_bytes:
                raise BadInput(413, f"request too large: over the limit of {limits.max_bytes:,} bytes", close=True)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def image_bytes(request) -> bytes:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (kind == "multipart/form-data" or kind.startswith("image/") or kind in (
                "application/octet-stream", "application/json")):
            raise BadInput(415, f"unsupported content type {kind or '(none)'!r}: send multipart/form-data with a "
                                "'file' field, an image/* body, or JSON {\"image\": base64}", close=True)
        body = await read_body(request)
        if kind == "multipart/form-data":
            async def once():
                yield body

            try:
                form = await MultiPartParser(request.headers, once(), max_part_size=limits.max_bytes).parse()
            except MultiPartException as e:
                raise BadInput(400, f"malformed multipart body: {e.message}") from None
            upload = form.get("file") or next((v for v in form.values() if hasattr(v, "read")), None)
            if upload is None or not hasattr(upload, "read"):
                raise BadInput(400, "multipart body without a file: send the image in a field named 'file'")
            part_type = (upload.content_type or "").lower()
            if part_type and not (part_type.startswith("image/") or part_type == "application/octet-stream"):
                raise BadInput(415, f"unsupported content type {part_type!r} for the uploaded file: send an image")
            return await upload.read()
        if kind == "application/json":
            try:
                payload = json.loads(body)
                text = payload["image"]
                if "," in text[:100] and text.startswith("data:"):
                    text = text.split(",", 1)[1]
                return base64.b64decode(text, validate=True)
            except RecursionError:  # [[[[... nested deeper than the parser's stack
                raise BadInput(400, "JSON body nested too deeply: send {\"image\": \"<base64 of an image file>\"}"
                               ) from None
            except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
                raise BadInput(400, "JSON body must be {\"image\": \"<base64 of an image file>\"}") from None
        return body

    def decode_and_prepare(data: bytes, keep: bool):
        pil = decode_image(data, limits.max_pixels)
        return servable.transform(pil), (pil if keep else None)

    def trim_if_grown() -> None:
        memory["timer"] = None
        now, rest = resident_bytes(), memory["rest"]
        if memory["trimming"] or now is None or rest is None or now <= rest + TRIM_SLACK:
            return
        memory["trimming"] = True

        def trimmed(_):
            memory["trimming"], memory["rest"] = False, resident_bytes()

        asyncio.get_running_loop().run_in_executor(None, release_freed_memory).add_done_callback(trimmed)

    @contextlib.contextmanager
    def in_flight():
        """Around a request: when the last one in flight ends, the trim waits TRIM_IDLE_S for the next."""
        memory["in_flight"] += 1
        if memory["timer"] is not None:
            memory["timer"].cancel()
            memory["timer"] = None
        try:
            yield
        finally:
            memory["in_flight"] -= 1
            if memory["in_flight"] == 0:
                memory["timer"] = asyncio.get_running_loop().call_later(TRIM_IDLE_S, trim_if_grown)

    def cam_of(pil, target: int) -> dict:
        from .cam import grad_cam

        if servable.cam_model is None:
            return {"cam": None, "cam_note": servable.cam_note}
        with cam_lock:
            result = grad_cam(servable.cam_model, pil, servable.transform, target, servable.class_names,
                              stage=servable.cam_stage)
        return {"cam": png_data_url(result.overlay), "cam_note": servable.cam_note, "cam_target": result.target_name}

    @app.post("/predict")
    async def predict(request: fastapi.Request, topk: int = fastapi.Query(5, ge=1), cam: bool = False):
        with in_flight():
            return await answer(request, topk, cam)

    async def answer(request, topk: int, cam: bool):
        t0 = time.perf_counter()
        with batcher.incoming():
            data = await image_bytes(request)
            # the full-size image is kept only for Grad-CAM, which draws on it
            keep = cam and servable.cam_model is not None
            x, pil = await asyncio.get_running_loop().run_in_executor(decoder, decode_and_prepare, data, keep)
            del data
        try:
            probs, batch = await batcher.submit(x)
        except QueueFull:
            return error(503, f"busy: {batcher.max_queue} requests already waiting; retry shortly",
                         {"Retry-After": "1"})
        k = min(topk, limits.max_topk, len(servable.class_names))
        indices = ranked(probs[None], k)[0]  # the tie rule of eval and predict
        values = probs[indices]
        preds = [{"label": servable.class_names[i], "index": i, "score": v}
                 for v, i in zip(values.tolist(), indices.tolist())]
        out = {"predictions": preds, "top1": preds[0]["label"], "batch_size": batch}
        if cam:
            out.update(await run_in_threadpool(cam_of, pil, preds[0]["index"]))
        out["ms"] = round(1e3 * (time.perf_counter() - t0), 2)
        return out

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": batcher.queue.qsize() if batcher.queue else 0,
                "batches": batcher.batches, "images": batcher.images, "uptime_s": round(time.time() - started, 1)}

    @app.get("/info")
    async def info():
        return {"model": servable.variant, "source": servable.source, "backend": servable.backend,
                "num_classes": len(servable.class_names), "classes": servable.class_names,
                "input_size": [3, servable.img_size, servable.img_size], "quantization": servable.quantization,
                "cam": servable.cam_model is not None, "cam_note": servable.cam_note,
                "batching": {"max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1e3,
                             "max_queue": batcher.max_queue},
                "limits": {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels,
                           "read_timeout_s": limits.read_timeout, "min_rate": limits.min_rate,
                           "max_decodes": limits.max_decodes}}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    app.state.batcher = batcher
    app.state.limits = limits
    return app


# ----------------------------------------------------------------------------- the HTTP server
def read_timeout_protocol(base: type, timeout: float) -> type:
    """``base`` (uvicorn's HTTP protocol class) with a deadline on request headers: from the connection's start
    and from each answer, a request's headers must be complete within ``timeout`` seconds. uvicorn itself
    closes only idle kept-alive connections, so a client that sends half a request line and stalls would hold
    its connection (and a slot) for as long as it likes. A partial request is answered 408 and logged in one
    line; a connection that sent nothing is closed quietly (browsers open spare ones). Request bodies have
    their own deadline in the application (:class:`Limits`), which knows how many bytes it has read."""

    class ReadTimeout(base):
        _timer = None
        _since = 0  # bytes received while waiting for headers

        def _arm(self) -> None:
            self._disarm()
            self._since = 0
            self._timer = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _busy(self) -> bool:
            """A request's headers are complete and its answer is not: its body has the app's deadline."""
            return self.cycle is not None and not self.cycle.response_complete

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing() or self._busy():
                return
            if self._since:
                reason = (f"request headers not complete within {timeout:g} s ({self._since:,} bytes received): "
                          "the connection is closed")
                where = "%s:%d" % tuple(self.client[:2]) if self.client else "unknown client"
                log.warning("408 from %s: %s", where, reason)
                body = json.dumps({"error": reason}).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            waiting, cycle = self._timer is not None, self.cycle
            self._since += len(data)
            super().data_received(data)
            if waiting and self.cycle is not cycle:  # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._busy():  # no pipelined request under way
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    ReadTimeout.__name__ = ReadTimeout.__qualname__ = f"ReadTimeout{base.__name__}"
    return ReadTimeout


def server_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", log_config="default"):
    """uvicorn's configuration for ``app``: its HTTP protocol with the header deadline of the app's
    :class:`Limits`, and the log set up so the server's own one-line reports appear beside uvicorn's
    (``log_config=None`` leaves logging as the caller set it)."""
    uvicorn = require("uvicorn", "serve", "metaformer serve")
    from uvicorn.config import LOGGING_CONFIG
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    limits = getattr(app.state, "limits", None) or Limits()
    if log_config == "default":
        log_config = copy.deepcopy(LOGGING_CONFIG)
        log_config["loggers"][log.name] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                          http=read_timeout_protocol(AutoHTTPProtocol, limits.read_timeout), log_config=log_config)


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    uvicorn = require("uvicorn", "serve", "metaformer serve")
    uvicorn.Server(server_config(app, host, port, log_level)).run()
