"""Requests/s and latency of `metaformer serve` under 1, 8 and 32 concurrent clients, on loopback; and, with
--hostile, how it holds up against hostile clients.

For each model file and server setting (dynamic batching as configured, and --max-batch 1 as the reference
without batching), this script starts `metaformer serve` on 127.0.0.1 in a subprocess, waits for /health, and
drives it from asyncio clients (httpx) in this process: each client posts the same image to /predict, back to
back, for --seconds per concurrency level (at most --max-requests in all). It reports completed requests/s,
p50/p99 latency, the mean batch the server ran (from /health), errors, and the pages the server faulted in
per request (from /proc/PID/stat). Bounded in time; loopback only.

--hostile adds, on one server per model (default settings, plus --server-args): --stalled connections that
send half a request line and stall, as many that send their headers and a few body bytes and stall (the seconds
until the server closes each, how many were answered 408, and a normal client's latency while they are
held); as many that leave mid-body (the server's log lines and tracebacks they caused); and a burst of --burst
concurrent uploads of a large allowed JPEG (--burst-pixels), with the server's resident memory before, at its
peak (VmHWM) and at rest --rest seconds later (VmRSS).

    python benchmarks/serve_load.py runs/digits/best.pth runs/digits/best_int8.onnx --md benchmarks/results/serve.md
    python benchmarks/serve_load.py runs/s12_random.safetensors --no-load --hostile \
        --md benchmarks/results/serve_hostile.md
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
import tempfile
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

    def log(self) -> str:
        """What the server wrote to stderr so far. Read with pread: the server shares the file's offset, so a
        seek here would make its next line overwrite the start of the log."""
        fd = self.err.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def memory(self) -> dict:
        """The server's resident memory now and at its peak, in MB (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

    def __enter__(self):
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.err)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log()[-2000:]}")
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
        self.err.close()


def minor_faults(pid: int | None) -> int:
    """Pages the process has faulted in so far (Linux); a page freed to the OS and used again costs one."""
    if pid is None:
        return 0
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


async def load(url: str, image: bytes, clients: int, seconds: float, max_requests: int, pid: int | None = None) -> dict:
    latencies, errors, started = [], 0, time.perf_counter()
    deadline = started + seconds
    health0, faults0 = httpx.get(url + "/health").json(), minor_faults(pid)

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
    faults = (minor_faults(pid) - faults0) / max(len(latencies), 1)
    batches = health1["batches"] - health0["batches"]
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors, "seconds": elapsed,
            "rps": len(lat) / elapsed, "p50_ms": 1e3 * statistics.median(lat) if lat else float("nan"),
            "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
            "mean_batch": (health1["images"] - health0["images"]) / max(batches, 1), "faults": faults}


# ----------------------------------------------------------------------------- hostile clients
async def hold(port: int, data: bytes, cap: float) -> tuple[float, bytes]:
    """Open a connection, send ``data`` and stall: the seconds until the server closes it (``cap`` if it has
    not by then) and what it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(data)
    await writer.drain()
    answer = b""
    try:
        answer = await asyncio.wait_for(reader.read(), cap)
    except (asyncio.TimeoutError, ConnectionError):
        pass
    held = time.perf_counter() - t0
    writer.close()
    return held, answer


async def leave(port: int, data: bytes) -> None:
    """Send ``data`` (headers and part of a body) and close the connection."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.close()


async def stalled(server: Server, image: bytes, count: int, cap: float) -> list[dict]:
    """``count`` connections with half a request line, ``count`` with full headers and 8 body bytes, all held
    at once, while one normal client posts back to back."""
    head = (b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: %d\r\n\r\n"
            % len(image))
    cases = {"half request line, then stall": b"POST /predict HT",
             "headers + 8 body bytes, then stall": head + image[:8]}
    tasks = {name: [asyncio.create_task(hold(server.port, data, cap)) for _ in range(count)]
             for name, data in cases.items()}
    latencies, done = [], asyncio.gather(*(t for ts in tasks.values() for t in ts))
    async with httpx.AsyncClient(timeout=cap) as http:
        while not done.done():
            t0 = time.perf_counter()
            r = await http.post(server.url + "/predict", content=image, headers={"content-type": "image/png"})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
    rows = []
    for name, ts in tasks.items():
        held = sorted(t.result()[0] for t in ts)
        answered = sum(t.result()[1].startswith(b"HTTP/1.1 408") for t in ts)
        rows.append({"case": name, "connections": count, "answered 408": answered,
                     "held s (median / max)": f"{statistics.median(held):.1f} / {held[-1]:.1f}"
                                              + (" (cap)" if held[-1] >= cap - 0.5 else ""),
                     "normal client meanwhile": f"{len(latencies)} answered, p50 "
                                                f"{1e3 * statistics.median(latencies):.0f} ms" if latencies else
                                                "none answered"})
    return rows


async def abandoned(server: Server, image: bytes, count: int) -> dict:
    """``count`` clients that send headers and half their body, then leave: the log lines they cause."""
    body = image * (1 + 20000 // len(image))
    head = (b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: %d\r\n\r\n"
            % len(body))
    before = server.log()
    await asyncio.gather(*(leave(server.port, head + body[:len(body) // 2]) for _ in range(count)))
    await asyncio.sleep(2)
    new = server.log()[len(before):]
    alive = httpx.get(server.url + "/health", timeout=30).status_code == 200
    return {"case": "headers + half the body, then leave", "connections": count,
            "log lines": len(new.splitlines()), "tracebacks": new.count("Traceback"),
            "still answering": "yes" if alive else "NO"}


def large_jpeg(pixels: int) -> bytes:
    """A photo-like JPEG of about ``pixels`` pixels (smooth gradients and mild noise, so it stays a few MB)."""
    import numpy as np
    from PIL import Image

    side = int(pixels ** 0.5)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    rgb = np.stack([x, y, (x + y) / 2], -1) * 200 + np.random.default_rng(0).normal(0, 4, (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


async def burst(server: Server, jpeg: bytes, count: int, rest: float) -> dict:
    before = server.memory()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=count)) as http:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(http.post(server.url + "/predict", content=jpeg,
                                              headers={"content-type": "image/jpeg"}) for _ in range(count)))
        took = time.perf_counter() - t0
    peak = server.memory()["VmHWM"]
    await asyncio.sleep(rest)
    return {"uploads": count, "answered 200": sum(r.status_code == 200 for r in rs), "seconds": f"{took:.1f}",
            "RSS before MB": f"{before['VmRSS']:.0f}", "peak MB": f"{peak:.0f}",
            f"RSS {rest:g} s later MB": f"{server.memory()['VmRSS']:.0f}"}


def table(rows: list[dict], source: str) -> list[str]:
    keys = ["served", *rows[0].keys()]
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join([source, *map(str, r.values())]) + " |" for r in rows)]


def hostile(source: str, image: bytes, args) -> list[str]:
    from PIL import Image

    jpeg = large_jpeg(args.burst_pixels)
    w, h = Image.open(io.BytesIO(jpeg)).size
    lines = []
    with Server(source, args.server_args) as server:
        asyncio.run(load(server.url, image, 1, 1.0, 50))  # warm the path once, untimed
        lines += ["", *table(asyncio.run(stalled(server, image, args.stalled, args.cap)), source)]
        lines += ["", *table([asyncio.run(abandoned(server, image, args.stalled))], source)]
        row = asyncio.run(burst(server, jpeg, args.burst, args.rest))
        lines += ["", f"burst: {w}x{h} JPEG ({w * h / 1e6:.1f} M pixels, {len(jpeg) / 1e6:.1f} MB) each",
                  *table([row], source)]
        bad = [line for line in server.log().splitlines() if "Traceback" in line]
        lines += ["", f"server log: {len(server.log().splitlines())} lines, {len(bad)} tracebacks"]
    return lines


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
    p.add_argument("--no-load", action="store_true", help="skip the requests/s levels")
    p.add_argument("--hostile", action="store_true", help="also stalled, abandoned and large-image clients")
    p.add_argument("--stalled", type=int, default=50, help="hostile connections of each kind")
    p.add_argument("--cap", type=float, default=120.0, help="seconds a stalled connection is watched at most")
    p.add_argument("--burst", type=int, default=16, help="large uploads sent at once")
    p.add_argument("--burst-pixels", type=int, default=36_000_000, help="pixels of each large upload")
    p.add_argument("--rest", type=float, default=5.0, help="seconds after the burst the resident memory is read")
    p.add_argument("--server-args", default="", help="more `metaformer serve` options for the --hostile server, "
                   "e.g. '--max-decodes 16'")
    args = p.parse_args()
    args.server_args = args.server_args.split()
    image = digit_png(args.img_size)
    levels = [int(c) for c in args.clients.split(",")]
    settings = [("batched", ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)])]
    if not args.no_reference:
        settings.append(("max-batch 1", ["--max-batch", "1"]))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    loadavg = f"; load average {[round(v, 2) for v in os.getloadavg()]} at the start" if hasattr(os, "getloadavg") else ""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    lines = [f"{cpu}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}; commit {commit}; image "
             f"{len(image)} bytes PNG; {args.seconds:g} s per level{loadavg}"]
    if not args.no_load:
        lines += ["", "| served | batching | clients | requests | requests/s | p50 ms | p99 ms | mean batch | errors | "
                  "page faults / request |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for source in args.sources:
        for name, extra in ([] if args.no_load else settings):
            with Server(source, extra) as server:
                asyncio.run(load(server.url, image, 1, 1.0, 50))  # warm the path once, untimed
                for clients in levels:
                    r = asyncio.run(load(server.url, image, clients, args.seconds, args.max_requests, server.proc.pid))
                    line = (f"| {source} | {name} | {clients} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
                            f"{r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['errors']} | {r['faults']:.0f} |")
                    lines.append(line)
                    print(line, flush=True)
        if args.hostile:
            more = hostile(source, image, args)
            lines += more
            print("\n".join(more), flush=True)
    if args.md:
        os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
