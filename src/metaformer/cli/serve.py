"""``metaformer serve``: a checkpoint or an exported file (int8 included) behind a JSON API and a web page."""
from __future__ import annotations

import ipaddress
import sys

from ..errors import need
from ..ranges import real, whole


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        description="Serve a classifier on FastAPI + uvicorn. POST /predict takes an image (multipart field 'file', "
                    "an image/* body, or JSON {\"image\": base64}; ?topk=5&cam=1) and answers the top-k labels; "
                    "concurrent requests are batched (bounded queue, --max-batch, --max-wait-ms). The page at / "
                    "shows the top-5 and a Grad-CAM overlay (checkpoints only; an exported file says it has none). "
                    "Bad input is a 4xx with a one-line reason. Binds to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("source", metavar="CHECKPOINT_OR_EXPORT", help="a checkpoint (ours name their model; others "
                   "need --model) or a file from `metaformer export` / `metaformer quantize` (.onnx, .pt, .pt2, "
                   "OpenVINO .xml)")
    p.add_argument("--model", help="variant name for a checkpoint that does not name its model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=whole(1, 65535), default=8000, help="TCP port")
    p.add_argument("--max-batch", type=whole(1, 4096), default=32, help="most images run as one batch")
    p.add_argument("--max-wait-ms", type=real(0, 10_000), default=5.0, help="how long a batch waits for more images after "
                                                                   "its first")
    p.add_argument("--max-queue", type=whole(1, 1_000_000), default=256, help="requests waiting at most; more are answered 503")
    p.add_argument("--max-mb", type=real(0, 4096, lo_open=True), default=10.0, help="largest request body in MiB (413 above)")
    p.add_argument("--max-pixels", type=whole(1, 178_956_970), default=40_000_000,
                   help="largest decoded image in pixels (413 above: decompression bombs; Pillow refuses more than "
                        "178,956,970 whatever this says)")
    p.add_argument("--max-decodes", type=whole(1, 256), default=None,
                   help="images decoded at once (default: the number of cores, at most 4); each holds up to 6 "
                        "bytes per pixel while it is decoded, so this bounds the memory of a burst of large uploads")
    p.add_argument("--read-timeout", type=real(0, 3600, lo_open=True), default=20.0,
                   help="seconds a request's headers may take to arrive, and its body's first allowance (one more "
                        "second per 500 bytes received); a slower request is answered 408 and its connection "
                        "closed")
    p.add_argument("--no-fused", dest="fused", action="store_false", help="run a checkpoint as built instead of "
                                                                         "the fused model")
    p.add_argument("--no-cam", dest="cam", action="store_false", help="no Grad-CAM (saves the plain model's "
                                                                     "memory)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (debug adds the access log)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..tools.serve import Limits, create_app, load_servable, run_server

    for module in ("fastapi", "uvicorn", "multipart"):  # checked before the model loads
        need(module, "serve", "metaformer serve")
    servable = load_servable(args.source, args.model, fused=args.fused, cam=args.cam)
    limits = Limits(max_bytes=int(args.max_mb * 2 ** 20), max_pixels=args.max_pixels, read_timeout=args.read_timeout)
    if args.max_decodes is not None:
        limits.max_decodes = args.max_decodes
    app = create_app(servable, args.max_batch, args.max_wait_ms, args.max_queue, limits)
    try:
        exposed = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        exposed = args.host != "localhost"
    if exposed:
        print(f"warning: --host {args.host} makes the server reachable from other machines; it has no "
              "authentication", file=sys.stderr)
    print(f"serving {servable.variant or 'model'} ({servable.backend}, {len(servable.class_names)} classes, "
          f"{servable.img_size} px) from {servable.source} on http://{args.host}:{args.port}/  "
          f"(Grad-CAM: {'on' if servable.cam_model is not None else 'unavailable'})", file=sys.stderr, flush=True)
    run_server(app, args.host, args.port, args.log_level)
    return 0
