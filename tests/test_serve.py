"""metaformer serve end to end: the JSON API through an HTTP client, dynamic batching, bad input answered with a
one-line 4xx, Grad-CAM on checkpoints and its stated absence on exported files; the page in headless chromium."""
import asyncio
import base64
import io
import os
import shutil
import socket
import threading
import time

import pytest
import torch
from PIL import Image

import metaformer
from metaformer.cli import build_parser

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from metaformer.tools.serve import Batcher, Limits, QueueFull, create_app, load_servable  # noqa: E402

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


def test_bad_input_is_a_one_line_4xx_and_the_server_goes_on(ckpt):
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
        "empty body": (400, dict(content=b"", headers={"content-type": "image/png"})),
        "topk 0": (422, dict(content=png(), headers={"content-type": "image/png"}, params={"topk": 0})),
    }
    with TestClient(app, raise_server_exceptions=False) as client:
        for what, (status, kwargs) in cases.items():
            r = client.post("/predict", **kwargs)
            assert r.status_code == status, (what, r.status_code, r.text)
            reason = r.json()["error"]
            assert reason and "\n" not in reason, what
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


def test_batcher_batches_concurrent_requests_and_bounds_its_queue():
    sizes, gate = [], threading.Event()

    def model(x):
        gate.wait(5)
        sizes.append(len(x))
        return x.flatten(1)[:, :3] * 10

    async def scenario():
        batcher = Batcher(model, max_batch=8, max_wait_ms=50, max_queue=16)
        batcher.start()
        inputs = [torch.full((1, 2, 2), float(i)) for i in range(12)]
        tasks = [asyncio.create_task(batcher.submit(x)) for x in inputs]
        await asyncio.sleep(0.2)  # all queued (the first batch holds the worker at the gate)
        extra = [asyncio.create_task(batcher.submit(torch.zeros(1, 2, 2))) for _ in range(13)]
        await asyncio.sleep(0.1)  # 4 still waiting + 13 more > 16: exactly one is refused, at once
        refused = [t for t in extra if t.done() and isinstance(t.exception(), QueueFull)]
        assert len(refused) == 1
        gate.set()
        results = await asyncio.gather(*tasks)
        await asyncio.gather(*(t for t in extra if t not in refused))
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert max(sizes) == 8 and sizes[0] == 8  # the first batch took every image that was waiting, up to 8
    for i, (probs, batch) in enumerate(results):  # each request got its own row back
        assert batch in sizes and torch.allclose(probs, torch.full((3,), 1 / 3))
    assert sum(sizes) == 12 + 12


def test_batcher_holds_a_batch_only_while_more_requests_are_on_their_way():
    async def scenario():
        batcher = Batcher(lambda x: x.flatten(1), max_batch=8, max_wait_ms=2000, max_queue=8)
        batcher.start()
        t0 = time.perf_counter()
        _, batch = await batcher.submit(torch.zeros(1, 1, 1))  # alone: answered without the 2 s wait
        alone = time.perf_counter() - t0
        with batcher.incoming():  # another request is being decoded: the batch waits for it
            first = asyncio.create_task(batcher.submit(torch.zeros(1, 1, 1)))
            await asyncio.sleep(0.3)
            assert not first.done()
            second = asyncio.create_task(batcher.submit(torch.ones(1, 1, 1)))
            await asyncio.sleep(0)
        results = await asyncio.gather(first, second)
        await batcher.stop()
        return alone, batch, results

    alone, batch, results = asyncio.run(scenario())
    assert alone < 1.0 and batch == 1
    assert [b for _, b in results] == [2, 2]  # the two ran as one batch


def test_serve_binds_to_loopback_unless_told():
    args = build_parser().parse_args(["serve", "runs/digits/best.pth"])
    assert args.host == "127.0.0.1"


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
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
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
