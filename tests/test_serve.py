"""metaformer serve end to end: the JSON API through an HTTP client, dynamic batching, bad input answered with a
one-line 4xx and one log line, uploads decoded as predict decodes files and only in the listed formats, bounded
decoding memory, stalled and abandoned connections on a real socket, Grad-CAM on checkpoints and its stated
absence on exported files; the page in headless chromium."""
import asyncio
import base64
import io
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

import metaformer

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from metaformer.tools.serve import Batcher, Limits, QueueFull, create_app, load_servable, server_config  # noqa: E402

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = metaformer.create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[16, 32, 48, 64], img_size=64,
                                    num_classes=10)
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    metaformer.save_weights(model, path, class_names=CLASSES)
    return path


def png(size=(48, 40), seed=0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def expected_top1(ckpt, data: bytes) -> str:
    """The plain PyTorch model's answer for the image, computed without the server."""
    from metaformer.tasks.inference import load_for_inference

    loaded = load_for_inference(None, str(ckpt))
    with torch.no_grad():
        logits = loaded.model(loaded.transform(Image.open(io.BytesIO(data)).convert("RGB"))[None])
    return CLASSES[int(logits.argmax())]


def test_predict_info_health_and_cam(ckpt):
    app = create_app(load_servable(str(ckpt)))
    image = png()
    with TestClient(app) as client:
        r = client.post("/predict?topk=3&cam=1", files={"file": ("x.png", image, "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["top1"] == expected_top1(ckpt, image)
        assert [p["label"] for p in body["predictions"]][0] == body["top1"] and len(body["predictions"]) == 3
        scores = [p["score"] for p in body["predictions"]]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
        cam = Image.open(io.BytesIO(base64.b64decode(body["cam"].split(",", 1)[1])))
        assert cam.size == (64, 64) and body["cam_target"] == body["top1"]
        # the same image as a raw body and as base64 JSON: the same answer
        raw = client.post("/predict", content=image, headers={"content-type": "image/png"}).json()
        b64 = client.post("/predict", json={"image": base64.b64encode(image).decode()}).json()
        assert raw["top1"] == b64["top1"] == body["top1"] and "cam" not in raw
        info = client.get("/info").json()
        assert info["classes"] == CLASSES and info["input_size"] == [3, 64, 64] and info["cam"] is True
        assert "fused" in info["backend"] and info["batching"]["max_batch"] == 32
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["images"] == 3


def test_bad_input_is_a_one_line_4xx_and_one_log_line_and_the_server_goes_on(ckpt, caplog):
    app = create_app(load_servable(str(ckpt), cam=False), limits=Limits(max_bytes=100_000, max_pixels=1_000_000))
    bomb = io.BytesIO()
    Image.new("L", (3000, 3000)).save(bomb, "PNG")  # ~9 MPixels in a few KiB
    assert len(bomb.getvalue()) < 100_000
    cases = {
        "text/plain body": (415, dict(content=b"hello", headers={"content-type": "text/plain"})),
        "not an image": (400, dict(files={"file": ("x.png", b"GIF89a but not really", "image/png")})),
        "a text file uploaded": (415, dict(files={"file": ("x.txt", b"hello", "text/plain")})),
        "too large": (413, dict(content=os.urandom(150_000), headers={"content-type": "image/png"})),
        "decompression bomb": (413, dict(content=bomb.getvalue(), headers={"content-type": "image/png"})),
        "truncated image": (400, dict(content=png()[:200], headers={"content-type": "image/png"})),
        "bad base64": (400, dict(json={"image": "%%%"})),
        "deeply nested JSON": (400, dict(content=b"[" * 20_000, headers={"content-type": "application/json"})),
        "deeply nested image": (400, dict(content=b'{"image": ' + b"{" * 20_000,
                                          headers={"content-type": "application/json"})),
        "empty body": (400, dict(content=b"", headers={"content-type": "image/png"})),
        "topk 0": (422, dict(content=png(), headers={"content-type": "image/png"}, params={"topk": 0})),
    }
    with TestClient(app, raise_server_exceptions=False) as client:
        for what, (status, kwargs) in cases.items():
            caplog.clear()
            with caplog.at_level(logging.INFO):
                r = client.post("/predict", **kwargs)
            assert r.status_code == status, (what, r.status_code, r.text)
            reason = r.json()["error"]
            assert reason and "\n" not in reason, what
            # one line in the server's log, naming the status and the reason; no traceback anywhere
            lines = [rec for rec in caplog.records if rec.name == "metaformer.serve"]
            assert len(lines) == 1 and lines[0].getMessage().startswith(f"{status} POST /predict from"), what
            assert reason in lines[0].getMessage() and "\n" not in lines[0].getMessage(), what
            assert not any(rec.exc_info for rec in caplog.records), what
        assert "decompression bomb" in client.post("/predict", **cases["decompression bomb"][1]).json()["error"]
        assert client.post("/predict", files={"file": ("x.png", png(), "image/png")}).status_code == 200


def test_exported_int8_file_is_served_and_says_cam_is_unavailable(ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    from metaformer.tasks.inference import load_for_inference
    from metaformer.tools.export import export_metadata
    from metaformer.tools.quantize import quantize_to_file

    loaded = load_for_inference(None, str(ckpt))
    path = quantize_to_file(loaded.model, torch.randn(8, 3, 64, 64), tmp_path / "int8.onnx",
                            metadata=export_metadata(loaded))
    with TestClient(create_app(load_servable(str(path)))) as client:
        info = client.get("/info").json()
        assert info["cam"] is False and "exported file" in info["cam_note"] and "ONNX Runtime" in info["backend"]
        body = client.post("/predict?cam=1", files={"file": ("x.png", png(), "image/png")}).json()
        assert body["cam"] is None and "exported file" in body["cam_note"] and body["top1"] in CLASSES


def test_a_file_exported_for_a_fixed_batch_answers_concurrent_requests(ckpt, tmp_path):
    """The batcher stacks concurrent images; a file exported for batch 1 runs them one per call, each answer the
    one the image gets alone."""
    pytest.importorskip("onnxruntime")
    from metaformer.cli import main

    one = tmp_path / "one.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--no-dynamic-batch", "-o", str(one)]) == 0
    with TestClient(create_app(load_servable(str(one)), max_batch=8, max_wait_ms=200)) as client:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: client.post("/predict", files={"file": ("x.png", png(seed=i),
                                                                                      "image/png")}), range(6)))
        alone = [client.post("/predict", files={"file": ("x.png", png(seed=i), "image/png")}).json()
                 for i in range(6)]
    assert [a.status_code for a in answers] == [200] * 6
    assert max(a.json()["batch_size"] for a in answers) > 1  # they were batched
    for a, b in zip(answers, alone):
        assert a.json()["top1"] == b["top1"]
        assert abs(a.json()["predictions"][0]["score"] - b["predictions"][0]["score"]) < 1e-5


def test_batcher_batches_concurrent_requests_and_bounds_its_queue():
    sizes, gate = [], threading.Event()

    def model(x):  # each row's scores depend on its own input: a row answered to another request shows
        gate.wait(5)
        sizes.append(len(x))
        return x.flatten(1)[:, :3] * torch.tensor([0.0, 0.1, 0.2])

    async def scenario():
        batcher = Batcher(model, max_batch=8, max_wait_ms=50, max_queue=16)
        batcher.start()
        inputs = [torch.full((1, 2, 2), float(i)) for i in range(12)]
        tasks = [asyncio.create_task(batcher.submit(x)) for x in inputs]
        await asyncio.sleep(0.2)  # all queued (the first batch holds the worker at the gate)
        extra = [asyncio.create_task(batcher.submit(torch.full((1, 2, 2), 20.0 + i))) for i in range(13)]
        await asyncio.sleep(0.1)  # 4 still waiting + 13 more > 16: exactly one is refused, at once
        refused = [t for t in extra if t.done() and isinstance(t.exception(), QueueFull)]
        assert len(refused) == 1
        gate.set()
        results = await asyncio.gather(*tasks)
        served = [(20.0 + i, await t) for i, t in enumerate(extra) if t not in refused]
        await batcher.stop()
        return [(float(i), r) for i, r in enumerate(results)] + served

    results = asyncio.run(scenario())
    assert max(sizes) == 8 and sizes[0] == 8  # the first batch took every image that was waiting, up to 8
    assert sum(sizes) == len(results) == 12 + 12
    for value, (probs, batch) in results:  # each request got its own row back, in whatever batch it ran
        assert batch in sizes and torch.allclose(probs, (value * torch.tensor([0.0, 0.1, 0.2])).softmax(0)), value


def test_batcher_holds_a_batch_only_while_more_requests_are_on_their_way():
    async def scenario():
        batcher = Batcher(lambda x: x.flatten(1) * torch.tensor([1.0, -1.0]), max_batch=8, max_wait_ms=2000,
                          max_queue=8)
        batcher.start()
        t0 = time.perf_counter()
        _, batch = await batcher.submit(torch.zeros(1, 1, 2))  # alone: answered without the 2 s wait
        alone = time.perf_counter() - t0
        with batcher.incoming():  # another request is being decoded: the batch waits for it
            first = asyncio.create_task(batcher.submit(torch.zeros(1, 1, 2)))
            await asyncio.sleep(0.3)
            assert not first.done()
            second = asyncio.create_task(batcher.submit(torch.ones(1, 1, 2)))
            await asyncio.sleep(0)
        results = await asyncio.gather(first, second)
        await batcher.stop()
        return alone, batch, results

    alone, batch, results = asyncio.run(scenario())
    assert alone < 1.0 and batch == 1
    assert [b for _, b in results] == [2, 2]  # the two ran as one batch, each answered with its own row
    assert torch.allclose(results[0][0], torch.tensor([0.5, 0.5]))
    assert torch.allclose(results[1][0], torch.tensor([1.0, -1.0]).softmax(0))


def test_serve_binds_to_loopback_unless_told_and_passes_its_limits_to_uvicorn(ckpt, monkeypatch, capsys):
    """What uvicorn is handed, not the parser's default: the address it binds and the header deadline."""
    import uvicorn

    from metaformer.cli import main

    configs = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: configs.append(self.config))
    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda self: None)  # the test's logging stays as is
    assert main(["serve", str(ckpt), "--no-cam"]) == 0
    assert main(["serve", str(ckpt), "--no-cam", "--host", "0.0.0.0", "--port", "8123", "--read-timeout", "3",
                 "--max-decodes", "1"]) == 0
    default, exposed = configs
    assert (default.host, default.port) == ("127.0.0.1", 8000)
    assert default.http.__name__.startswith("ReadTimeout") and default.app.state.limits.read_timeout == 20
    assert (exposed.host, exposed.port) == ("0.0.0.0", 8123)
    assert exposed.app.state.limits.read_timeout == 3 and exposed.app.state.limits.max_decodes == 1
    assert "reachable from other machines" in capsys.readouterr().err


def test_the_server_process_keeps_glibc_defaults_while_other_verbs_keep_freed_memory(monkeypatch):
    """keep_freed_memory holds a process's peak heap until it exits: right for a benchmark, not for a server."""
    import metaformer.cli as cli
    import metaformer.fast.alloc as alloc

    applied = []
    monkeypatch.setattr(alloc, "keep_freed_memory", lambda *a: applied.append(True))
    monkeypatch.setattr(cli, "main", lambda argv=None: 0)
    for verb, keeps in (("serve", False), ("info", True)):
        applied.clear()
        monkeypatch.setattr(sys, "argv", ["metaformer", verb, "x"])
        with pytest.raises(SystemExit):
            cli.program()
        assert bool(applied) == keeps, verb


# ----------------------------------------------------------------------------- decoding: as every reader decodes
def oriented(fmt: str, orientation: int) -> bytes:
    """A 48x40 image (a red band on its left, noise elsewhere) whose EXIF says: turn me (JPEG: in its APP1
    segment; PNG: in an eXIf chunk)."""
    g = torch.Generator().manual_seed(1)
    pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8)
    pixels[:, :12] = torch.tensor([250, 20, 20], dtype=torch.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_a_photo_turned_by_its_exif_tag_gets_the_answer_predict_gives(ckpt, tmp_path):
    from metaformer.tasks.inference import load_for_inference, predict

    loaded = load_for_inference(None, str(ckpt))
    with TestClient(create_app(load_servable(str(ckpt), cam=False))) as client:
        for fmt, orientation in (("JPEG", 6), ("JPEG", 8), ("PNG", 6)):
            data = oriented(fmt, orientation)
            path = tmp_path / f"photo{orientation}.{fmt.lower()}"
            path.write_bytes(data)
            want = dict(predict(loaded, [path], topk=10)[0]["predictions"])
            r = client.post("/predict?topk=10", content=data, headers={"content-type": f"image/{fmt.lower()}"})
            got = {p["label"]: p["score"] for p in r.json()["predictions"]}
            assert got.keys() == want.keys() and all(abs(got[c] - want[c]) < 1e-4 for c in CLASSES), (fmt, got, want)
            # the pixels as stored (sideways) answer differently, so the comparison above can tell
            with torch.no_grad():
                stored = loaded.model(loaded.transform(Image.open(io.BytesIO(data)).convert("RGB"))[None])
            sideways = stored.softmax(1)[0]
            assert max(abs(want[c] - float(sideways[i])) for i, c in enumerate(CLASSES)) > 1e-3, fmt


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n0 0 moveto 16 16 lineto stroke\n"
       b"showpage\n%%EOF\n")


def encoded(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png())).convert(mode).save(buf, fmt)
    return buf.getvalue()


def test_only_the_listed_formats_are_decoded_and_others_are_a_415(ckpt, monkeypatch):
    """An EPS body would be rendered by Ghostscript, a PostScript interpreter: it must never get that far."""
    import PIL.EpsImagePlugin

    from metaformer.data.images import UPLOAD_FORMATS, FormatRefused, open_rgb

    ghostscript = []
    monkeypatch.setattr(PIL.EpsImagePlugin, "Ghostscript", lambda *a, **k: ghostscript.append(a) or 1 / 0)
    with TestClient(create_app(load_servable(str(ckpt), cam=False)), raise_server_exceptions=False) as client:
        for fmt, data in (("EPS", EPS), ("PPM", encoded("PPM")), ("PCX", encoded("PCX"))):
            for kind in ("image/png", "application/octet-stream"):  # whatever the client claims
                r = client.post("/predict", content=data, headers={"content-type": kind})
                reason = r.json()["error"]
                assert r.status_code == 415 and f"{fmt} (by its first bytes) is not an accepted" in reason, reason
                assert "\n" not in reason and "JPEG, PNG" in reason, reason
        assert not ghostscript
        for fmt, mode in (("JPEG", "RGB"), ("PNG", "RGB"), ("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P"),
                          ("TIFF", "RGB")):
            r = client.post("/predict", content=encoded(fmt, mode), headers={"content-type": "image/x"})
            assert r.status_code == 200, (fmt, r.text)
    assert set(UPLOAD_FORMATS) == {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"}
    # the shared decoder itself refuses it: the same list wherever a file comes from a client
    with pytest.raises(FormatRefused, match="EPS .by its first bytes. is not an accepted image format"):
        open_rgb(EPS, "x.eps", formats=UPLOAD_FORMATS)
    assert not ghostscript


def test_decodes_are_capped_and_freed_memory_is_given_back_after_a_burst(ckpt, monkeypatch):
    """A burst of uploads is decoded at most max_decodes at a time; once no request is in flight and the process
    grew, the heap's free pages go back to the OS, once."""
    import httpx

    import metaformer.fast.alloc as alloc
    import metaformer.tools.serve as serve

    running, peak, trims, grown = [0], [0], [], [False]
    decode = serve.decode_image

    def slow_decode(data, max_pixels):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        grown[0] = True
        running[0] -= 1
        return decode(data, max_pixels)

    monkeypatch.setattr(serve, "decode_image", slow_decode)
    monkeypatch.setattr(serve, "TRIM_IDLE_S", 0.05)
    monkeypatch.setattr(alloc, "resident_bytes", lambda: 2 ** 30 if grown[0] else 2 ** 28)
    monkeypatch.setattr(alloc, "release_freed_memory", lambda: trims.append(running[0]) or True)
    app = create_app(load_servable(str(ckpt), cam=False), limits=Limits(max_decodes=2))

    async def burst():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
                rs = await asyncio.gather(*(client.post("/predict", content=png(seed=i),
                                                        headers={"content-type": "image/png"}) for i in range(8)))
                for _ in range(100):  # the trim runs on a worker thread once the server is idle
                    if trims:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                # one more request and idle period: the process has not grown since the trim
                again = await client.post("/predict", content=png(), headers={"content-type": "image/png"})
                assert again.status_code == 200
                await asyncio.sleep(0.2)
        return rs

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 8
    assert peak[0] == 2  # the burst did decode two at a time, never more
    assert trims == [0]  # once, when no decode was running, and not again while nothing grew


# ----------------------------------------------------------------------------- hostile clients on a real socket
def exchange(port: int, data: bytes, dripped: bytes = b"", close_after_send: bool = False, wait: float = 5.0) -> bytes:
    """Send ``data``, then ``dripped`` a byte every 0.1 s, and read until the server closes or ``wait`` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        for i in range(len(dripped)):
            try:
                sock.sendall(dripped[i:i + 1])
            except OSError:  # the server closed on us: what it said is in the socket
                break
            time.sleep(0.1)
        if close_after_send:
            return b""
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
        return b"".join(chunks)


def test_stalled_and_abandoned_requests_are_cut_off_with_one_log_line_each(ckpt, caplog):
    app = create_app(load_servable(str(ckpt), cam=False), limits=Limits(read_timeout=0.5, min_rate=500))
    head = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: 100000\r\n\r\n"
    with caplog.at_level(logging.INFO), LiveServer(app) as url:
        port = int(url.rsplit(":", 1)[1])
        t0 = time.perf_counter()
        half_headers = exchange(port, b"POST /predict HTTP/1.1\r\nhost: x\r\n")
        stalled_body = exchange(port, head + b"\x89PNG\r\n\x1a\n")
        dripped_head = exchange(port, b"", dripped=head)  # 10 bytes/s: a deadline, not a timeout per read
        dripped_body = exchange(port, head, dripped=b"\x89PNG" * 100)
        silent = exchange(port, b"")
        took = time.perf_counter() - t0
        exchange(port, head + png()[:1000], close_after_send=True)  # leaves mid-body
        deadline = time.time() + 10
        while len([r for r in caplog.records if r.name == "metaformer.serve"]) < 5 and time.time() < deadline:
            time.sleep(0.05)
        good = exchange(port, b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\nconnection: close"
                        b"\r\ncontent-length: %d\r\n\r\n%s" % (len(png()), png()))
    for answer, why in ((half_headers, "headers not complete"), (stalled_body, "body too slow"),
                        (dripped_head, "headers not complete"), (dripped_body, "body too slow")):
        status, _, body = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408") and b"connection: close" in status.lower(), answer
        assert b"\n" not in body and why in json.loads(body)["error"], answer
    assert silent == b""  # an idle connection is closed without a word
    assert took < 10  # each cut off after about 0.5 s, not held
    assert good.startswith(b"HTTP/1.1 200") and b'"top1"' in good  # and the server goes on
    lines = [r.getMessage() for r in caplog.records if r.name == "metaformer.serve"]
    assert len(lines) == 5 and all("\n" not in line for line in lines), lines  # four 408s, one client that left
    assert sum(line.startswith("408") for line in lines) == 4 and sum("left before" in line for line in lines) == 1
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


# ----------------------------------------------------------------------------- the page in a real browser
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser_missing() -> str | None:
    if not (os.path.exists(CHROMIUM) and (os.path.exists(DRIVER) or shutil.which("chromedriver"))):
        return "no Debian chromium + chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): apt-get install them"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


class LiveServer:
    """uvicorn on a free loopback port in a thread, stopped at exit."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(server_config(app, port=self.port, log_level="warning", log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_page_in_headless_chromium_shows_top1_and_cam(ckpt, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "upload.png"
    image.write_bytes(png(seed=3))
    want = expected_top1(ckpt, image.read_bytes())
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,700"):
        options.add_argument(flag)
    service = Service(DRIVER if os.path.exists(DRIVER) else shutil.which("chromedriver"))
    with LiveServer(create_app(load_servable(str(ckpt)))) as url:
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: "classes" in d.find_element(By.ID, "info").text)
            driver.find_element(By.ID, "file").send_keys(str(image))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .row"))
            rows = driver.find_elements(By.CSS_SELECTOR, "#results .row")
            assert len(rows) == 5 and rows[0].find_element(By.CLASS_NAME, "label").text == want
            cam = driver.find_element(By.ID, "cam")
            wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", cam))
            assert cam.is_displayed() and cam.get_attribute("src").startswith("data:image/png")
            assert driver.find_element(By.ID, "error").text == ""
            if os.environ.get("METAFORMER_SCREENSHOT"):
                driver.save_screenshot(os.environ["METAFORMER_SCREENSHOT"])
        finally:
            driver.quit()
