"""``metaformer serve``: a classifier behind an HTTP API and a web page (FastAPI + uvicorn).

* ``POST /predict``: an image as a multipart upload (field ``file``), a raw ``image/*`` body, or JSON
  ``{"image": BASE64}``; ``?topk=5&cam=1``. Answers the top-k labels and scores, and with ``cam=1`` a
  Grad-CAM overlay of the top class (PNG data URL) or the one-line reason it is unavailable.
* ``GET /health``, ``GET /info`` (model, classes, input size, backend, batching, limits).
* ``GET /``: the page (drop or choose an image; top-5 bars; the CAM overlay).

Concurrent requests are batched: a bounded queue (a full queue answers 503 at once) and one worker
that takes up to ``max_batch`` waiting images, waiting after the first at most ``max_wait_ms`` (and no
longer than recent batches took to run) while other requests are still being read and decoded (a lone
request never waits), and runs them as one batch on one thread. Bad input is a 4xx with a one-line ``{"error": ...}``: not an
image (400), too large (413, body over ``max_bytes``), a decompression bomb (413, more pixels than
``max_pixels``), a content type that is not an image (415).
"""

import asyncio
import base64
import binascii
import contextlib
import copy
import io
import json
import threading
import time
import warnings
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
EXPORT_SUFFIXES = (".onnx", ".pt", ".pt2")


class ServeError(MetaFormerError):
    """A model that cannot be served as asked."""


class BadInput(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


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
    has blocks :func:`metaformer.fuse` covers, or an exported file (ONNX, int8 ONNX, TorchScript, .pt2) run in
    its own runtime."""
    if source.endswith(EXPORT_SUFFIXES):
        from .exported import load_exported

        loaded = load_exported(source, model_name)
        run = loaded.model
        quant = run.quantization
        backend = {"onnx": "ONNX Runtime", "torchscript": "TorchScript", "exported": "torch.export"}[run.format]
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
    """8-bit RGB from encoded bytes; :class:`BadInput` for what is not an image or would decode too large."""
    from PIL import Image, UnidentifiedImageError

    from ..data.images import DataError, to_rgb

    if not data:
        raise BadInput(400, "empty body: send an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadInput(413, f"decompression bomb refused: {w}x{h} = {w * h:,} pixels, over the limit of "
                                    f"{max_pixels:,}")
            img.load()
            return to_rgb(img, "upload")
    except BadInput:
        raise
    except Image.DecompressionBombError as e:
        raise BadInput(413, f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:
        raise BadInput(400, "not an image: the body is no image format PIL can read") from None
    except DataError as e:
        raise BadInput(400, str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadInput(400, f"unreadable image ({type(e).__name__}: {str(e)[:120]})") from None


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
    max_bytes: int = 10 * 2 ** 20  # request body
    max_pixels: int = 40_000_000  # decoded image (PIL's own warning starts at ~89M)
    max_topk: int = 100


def create_app(servable: Servable, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256,
               limits: Limits | None = None):
    """The FastAPI application serving ``servable`` (see the module docstring)."""
    fastapi = require("fastapi", "serve", "metaformer serve")
    require("multipart", "serve", "metaformer serve (multipart uploads)")
    from contextlib import asynccontextmanager

    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser

    limits = limits or Limits()
    batcher = Batcher(servable.predict, max_batch, max_wait_ms, max_queue)
    cam_lock = threading.Lock()  # Grad-CAM hooks the model: one at a time
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        # the first call packs weights, allocates and imports Grad-CAM: done here, not in a client's request
        await run_in_threadpool(warm_up, servable)
        batcher.start()
        yield
        await batcher.stop()

    app = fastapi.FastAPI(title="metaformer serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)

    def error(status: int, reason: str, headers: dict | None = None):
        return JSONResponse({"error": reason}, status_code=status, headers=headers)

    @app.exception_handler(BadInput)
    async def _bad_input(request, exc: BadInput):
        return error(exc.status, exc.reason)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
        return error(422, f"invalid {where or 'request'}: {first.get('msg', 'bad value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise BadInput(413, f"request too large: {int(declared):,} bytes, over the limit of "
                                f"{limits.max_bytes:,}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_bytes:
                raise BadInput(413, f"request too large: over the limit of {limits.max_bytes:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def image_bytes(request) -> bytes:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (kind == "multipart/form-data" or kind.startswith("image/") or kind in (
                "application/octet-stream", "application/json")):
            raise BadInput(415, f"unsupported content type {kind or '(none)'!r}: send multipart/form-data with a "
                                "'file' field, an image/* body, or JSON {\"image\": base64}")
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
            except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
                raise BadInput(400, "JSON body must be {\"image\": \"<base64 of an image file>\"}") from None
        return body

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
        t0 = time.perf_counter()
        with batcher.incoming():
            data = await image_bytes(request)
            pil = await run_in_threadpool(decode_image, data, limits.max_pixels)
            x = await run_in_threadpool(servable.transform, pil)
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
                "limits": {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels}}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    app.state.batcher = batcher
    return app


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    uvicorn = require("uvicorn", "serve", "metaformer serve")
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")
