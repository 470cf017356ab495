"""``nvlm serve``: load a saved model, start the engine and uvicorn; and a background server for tests/bench.

uvicorn provides keep-alive timeouts, header-size limits and graceful shutdown: on SIGTERM it stops accepting
connections, lets open responses (streams included) finish within ``--graceful-timeout``, then the app's
lifespan drains the engine, and the process exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("nvlm.serve")


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server with continuous batching and a web chat",
        description="Serve a saved model at /v1/chat/completions and /v1/completions (OpenAI schema, SSE "
        "streaming, logprobs), /tokenize, /detokenize, /tokenizer_info, /v1/models, /health, /metrics, and a web "
        "chat at /.",
    )
    p.add_argument("model", help="a folder written by save_pretrained")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 1..65535 (default 8000)")
    p.add_argument("--served-model-name", default=None, help="the id in /v1/models (default: the folder name)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 503")
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=16384,
        help="prompt tokens prefilled per step (longer ones: in chunks)",
    )
    # the engine's caches and KV budget (nvlm.serve.encoder_cache, nvlm.serve.scheduler)
    p.add_argument("--encoder-cache-gb", type=float, default=1.0, help="image features kept across requests (0: off)")
    p.add_argument(
        "--max-kv-tokens", type=int, default=None, help="rows x positions a step may attend (preempts past it)"
    )
    p.add_argument(
        "--prefix-cache", action=argparse.BooleanOptionalAction, default=True, help="reuse prompt blocks' KV"
    )
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument(
        "--max-tiles",
        type=int,
        default=None,
        help="most regular tiles per image a request may ask for (image_url.max_dynamic_patch or "
        "mm_processor_kwargs.max_dynamic_patch; default and ceiling: the model's tiling.max_tiles)",
    )
    p.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    p.add_argument("--max-image-pixels", type=int, default=40_000_000)
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024, help="request body limit (413)")
    p.add_argument("--allowed-media-domains", nargs="*", default=[], help="hosts image_url may fetch from")
    p.add_argument("--allowed-local-media-path", default=None, help="file:// image URLs only under this folder")
    p.add_argument("--api-key-file", default=None, help="a file holding the bearer key clients must send")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--graceful-timeout", type=int, default=30, help="seconds SIGTERM waits for open requests")
    add_memory_arguments(p)
    p.set_defaults(func=cmd_serve)


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """Quantization and the memory plan (``nvlm.inference.memory``): --dry-run prints it without loading."""
    from nvlm.inference.schemes import add_arguments

    add_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print GiB per GPU from the config alone; load nothing")
    p.add_argument("--json", action="store_true", help="--dry-run: the plan as one JSON object (GiB)")
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel GPUs: --dry-run plans for them; to run, start one process per GPU with torchrun "
        "--nproc_per_node=N -m nvlm serve MODEL (the process count is the TP degree)",
    )
    p.add_argument("--max-model-len", type=int, default=4096, help="tokens a request may hold (KV cache plan)")


def serving_plan(args: argparse.Namespace) -> Any:
    """The memory plan's settings from serve's flags."""
    from nvlm.inference.memory import Serving, resolve
    from nvlm.inference.schemes import parse_keep

    device, dtype = resolve(args.device, args.dtype)
    if args.dry_run and args.device == "auto":
        device, dtype = "cuda", "bfloat16" if args.dtype == "auto" else dtype  # a plan is for GPUs by default
    return Serving(
        tp=args.tp,
        quantize=args.quantize,
        keep=parse_keep(args.quantize_keep),
        dtype=dtype,
        device=device,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        max_prefill_tokens=args.max_prefill_tokens,
        images=args.max_images,
    )


def dry_run(args: argparse.Namespace) -> int:
    import json

    from nvlm.inference.memory import plan, render, serving_model

    report = plan(serving_model(args.model), serving_plan(args))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _port(text: str) -> int:
    """argparse type: a TCP port; a bad one is a one-line usage error, not uvicorn's OverflowError at bind."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, got {port}")
    return port


def load_model(path: str, device: str = "auto", dtype: str = "auto") -> Any:
    import torch

    import nvlm

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return nvlm.load(path, dtype=getattr(torch, dtype), device=device)


def build_app(model: Any, processor: Any, args: argparse.Namespace, api_key: str | None = None) -> Any:
    from nvlm.serve.app import create_app
    from nvlm.serve.engine import Engine
    from nvlm.serve.media import MediaGate, MediaPolicy

    engine = Engine(
        model,
        processor,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens,
        encoder_cache_gb=getattr(args, "encoder_cache_gb", 1.0),
        max_kv_tokens=getattr(args, "max_kv_tokens", None),
        prefix_cache=getattr(args, "prefix_cache", True),
    )
    policy = MediaPolicy(
        allowed_domains=tuple(d.lower() for d in args.allowed_media_domains),
        allowed_local_path=args.allowed_local_media_path,
        max_bytes=args.max_image_bytes,
        max_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_tiles=getattr(args, "max_tiles", None),
    )
    name = args.served_model_name or Path(args.model).name
    return create_app(engine, MediaGate(policy), model_name=name, api_key=api_key, max_body_bytes=args.max_body_bytes)


def uvicorn_config(app: Any, host: str, port: int, limit: int, graceful: int = 30) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,  # idle keep-alive connections are closed after 5 s
        h11_max_incomplete_event_size=64 * 1024,  # header block limit
        limit_concurrency=limit,  # a backstop above the engine's own queue: 503
        timeout_graceful_shutdown=graceful,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from nvlm.errors import UserError

    if not (Path(args.model) / "config.json").is_file():  # said before torch and the model load
        raise UserError(
            f"{args.model}: no saved nvlm model there (no config.json); give a folder written by save_pretrained, "
            "e.g. a run's final/ folder (nvlm demo writes runs/demo/nvlm-d/stage2/final)"
        )
    if args.dry_run:
        return dry_run(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    api_key = None
    if args.api_key_file:
        try:
            api_key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            print(f"error: --api-key-file: {e}", file=sys.stderr)
            return 2
        if not api_key:
            print(f"error: --api-key-file {args.api_key_file} is empty", file=sys.stderr)
            return 2
    if not _loopback(args.host) and not api_key:
        log.warning(
            "binding %s without --api-key-file: anyone who can reach this address can use the model",
            args.host,
        )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        from nvlm.inference.memory import load_checked

        model, processor = load_checked(args.model, serving_plan(args))
    except UserError:
        raise
    except (OSError, ValueError) as e:
        print(f"error: cannot load {args.model}: {e}", file=sys.stderr)
        return 2
    try:
        app = build_app(model, processor, args, api_key)
    except ValueError as e:  # a setting the model cannot take (--max-tiles)
        print(f"error: {e}", file=sys.stderr)
        return 2
    limit = 2 * (args.max_batch + args.max_queue) + 32
    log.info("serving %s on http://%s:%d (web chat at /)", args.model, args.host, args.port)
    import signal

    import uvicorn

    # uvicorn drains on SIGTERM, then re-raises the signal to the handler that was there before it: make that
    # a no-op, so a drained server exits 0 (what process managers expect from a clean stop)
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(uvicorn_config(app, args.host, args.port, limit, args.graceful_timeout)).run()
    finally:  # tensor parallelism: the engine has drained; the other ranks return too
        steps = getattr(model, "tp_steps", None)
        if steps is not None:
            steps.close()
    log.info("stopped")
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BackgroundServer:
    """uvicorn on 127.0.0.1 (a free port) in a thread: ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: Any, limit: int = 1000, timeout_keep_alive: int = 5) -> None:
        config = uvicorn_config(app, "127.0.0.1", 0, limit)
        config.timeout_keep_alive = timeout_keep_alive
        import uvicorn

        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
