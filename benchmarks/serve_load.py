"""Requests/s and latency of `metaformer serve` under 1, 8 and 32 concurrent clients, on loopback.

For each model file and server setting (dynamic batching as configured, and --max-batch 1 as the reference
without batching), this script starts `metaformer serve` on 127.0.0.1 in a subprocess, waits for /health, and
drives it from asyncio clients (httpx) in this process: each client posts the same image to /predict, back to
back, for --seconds per concurrency level (at most --max-requests in all). It reports completed requests/s,
p50/p99 latency, the mean batch the server ran (from /health), and errors. Bounded in time; loopback only.

    python benchmarks/serve_load.py runs/digits/best.pth runs/digits/best_int8.onnx --md results/serve.md
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digit_png(size: int = 32) -> bytes:
    from PIL import Image
    from sklearn.datasets import load_digits

    img = Image.fromarray((load_digits().images[7] * 15).astype("uint8")).resize((size, size)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class Server:
    def __init__(self, source: str, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "metaformer", "serve", source, "--port", str(self.port), "--log-level",
                    "warning", "--no-cam", *extra]

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not answer /health within 300 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def load(url: str, image: bytes, clients: int, seconds: float, max_requests: int) -> dict:
    latencies, errors, started = [], 0, time.perf_counter()
    deadline = started + seconds
    health0 = httpx.get(url + "/health").json()

    async def client(http: httpx.AsyncClient):
        nonlocal errors
        while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/predict", content=image, headers={"content-type": "image/png"})
            except httpx.HTTPError:  # a dropped connection counts as an error, it does not end the run
                errors += 1
                continue
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    health1 = httpx.get(url + "/health").json()
    batches = health1["batches"] - health0["batches"]
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors, "seconds": elapsed,
            "rps": len(lat) / elapsed, "p50_ms": 1e3 * statistics.median(lat) if lat else float("nan"),
            "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
            "mean_batch": (health1["images"] - health0["images"]) / max(batches, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="checkpoints or exported files to serve, one after the other")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels")
    p.add_argument("--seconds", type=float, default=10.0, help="per level")
    p.add_argument("--max-requests", type=int, default=20000, help="per level, at most")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--no-reference", action="store_true", help="skip the --max-batch 1 reference server")
    p.add_argument("--img-size", type=int, default=32, help="size of the digit image sent")
    p.add_argument("--md", help="also write the table here")
    args = p.parse_args()
    image = digit_png(args.img_size)
    levels = [int(c) for c in args.clients.split(",")]
    settings = [("batched", ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)])]
    if not args.no_reference:
        settings.append(("max-batch 1", ["--max-batch", "1"]))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    load = f"; load average {[round(v, 2) for v in os.getloadavg()]} at the start" if hasattr(os, "getloadavg") else ""
    lines = [f"{cpu}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}; image {len(image)} bytes PNG; "
             f"{args.seconds:g} s per level{load}", "",
             "| served | batching | clients | requests | requests/s | p50 ms | p99 ms | mean batch | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for source in args.sources:
        for name, extra in settings:
            with Server(source, extra) as server:
                asyncio.run(load(server.url, image, 1, 1.0, 50))  # warm the path once, untimed
                for clients in levels:
                    r = asyncio.run(load(server.url, image, clients, args.seconds, args.max_requests))
                    line = (f"| {source} | {name} | {clients} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
                            f"{r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['errors']} |")
                    lines.append(line)
                    print(line, flush=True)
    if args.md:
        os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
