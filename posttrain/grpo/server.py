"""Server mode: ``posttrain vllm-serve`` runs rollouts in its own process (on its own GPUs), the trainer drives it
over HTTP and pushes weights to it with the collective broadcast of ``posttrain.rollout.weight_sync``.

The server (``run``): vLLM (``--engine vllm``, in-process so the received tensors go straight to its model's
``load_weights``; one GPU per server, so tensor parallelism > 1 is not supported here) or the native engine
(``--engine native`` or ``transformers``, CPU or GPU: the same protocol, tested on the CPU with gloo); the engine is
chosen through ``posttrain.rollout.registry`` and must take weights. Endpoints, JSON in and out:
    GET  /health             {"status", "engine", "weights_version", "sync": "none|joining|ready|receiving|failed",
                              "sync_error"}
    POST /generate           {"prompts": [[ids]], "sampling": {SamplingParams fields}} -> {"completions": [...]}
                             (prompt-major, token ids, sampler log-probs, finish reasons: the engine interface)
    POST /init_weight_sync   {"host", "port", "world_size", "rank", "backend", "timeout_s"}: join the trainer's
                             group (in a background thread; answers at once, the trainer's rendezvous waits)
    POST /update_weights     {}: receive one broadcast (background thread, generation paused meanwhile); one that
                             arrives while the join is still in progress waits for it
    POST /close_weight_sync  {}
A failed or timed-out sync leaves the server serving the weights it had and reports ``sync: failed`` with the
error; the trainer sees its own :class:`~posttrain.rollout.weight_sync.WeightSyncError` within the time-out.

Beside them, the OpenAI API of ``posttrain serve`` (``posttrain.serving.server.OpenAIRoutes``) on the same engine,
for probing the policy being trained (with ``--engine vllm``, its log-probs are the processed ones GRPO needs).

The client is :class:`posttrain.rollout.remote.RemoteEngine` (the ``server`` engine); this module is only the HTTP side.
The server binds 127.0.0.1 unless told otherwise; ``--api-key`` guards the ``/v1`` routes only (as vLLM's server
does), not the rollout and weight-sync endpoints: never expose it to an untrusted network.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from posttrain.rollout.base import EngineError, SamplingParams
from posttrain.rollout.batching import BatchScheduler
from posttrain.rollout.remote import OPTIONAL_FIELDS, SAMPLING_FIELDS
from posttrain.rollout.weight_sync import SyncGroupConfig, WeightReceiver
from posttrain.serving.http import HttpServer, RequestError, ServingApp, read_json
from posttrain.serving.server import OpenAIRoutes

logger = logging.getLogger(__name__)


class RolloutServer:
    """The engine, its lock (generation and weight loading never overlap) and the weight-sync state."""

    def __init__(self, engine, apply_weights, engine_name: str):
        self.engine, self.apply_weights, self.engine_name = engine, apply_weights, engine_name
        self.lock = threading.Lock()
        self.receiver: WeightReceiver | None = None
        self.sync_state, self.sync_error, self.weights_version = "none", "", 0
        self._joining: tuple[threading.Thread, float] | None = None  # the join in progress and its time-out

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "engine": self.engine_name, "weights_version": self.weights_version,
                "sync": self.sync_state, "sync_error": self.sync_error}

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        prompts = body.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, list) for p in prompts):
            raise ValueError("generate: 'prompts' must be a list of token-id lists")
        sampling = body.get("sampling", {})
        known = [*SAMPLING_FIELDS, *OPTIONAL_FIELDS]
        unknown = set(sampling) - set(known)
        if unknown:
            raise ValueError(f"generate: unknown sampling fields {sorted(unknown)} (known: {known})")
        params = SamplingParams(**sampling)
        with self.lock:
            outs = self.engine.generate(prompts, params)
        return {"completions": [{"prompt_index": o.prompt_index, "token_ids": o.token_ids, "logprobs": o.logprobs,
                                 "finish_reason": o.finish_reason} for o in outs]}

    def _in_background(self, state: str, job) -> threading.Thread:
        def run():
            try:
                job()
            except Exception as e:  # noqa: BLE001 - reported through /health; the trainer has its own error
                logger.error("weight sync failed: %s", e)
                self.sync_state, self.sync_error = "failed", str(e)

        self.sync_state, self.sync_error = state, ""
        thread = threading.Thread(target=run, daemon=True, name=f"posttrain-sync-{state}")
        thread.start()
        return thread

    def init_weight_sync(self, body: dict[str, Any]) -> dict[str, Any]:
        cfg = SyncGroupConfig(**{k: body[k] for k in ("host", "port", "world_size", "backend", "timeout_s") if k in body})
        rank = int(body.get("rank", 1))

        def join():
            self.receiver = WeightReceiver(cfg, rank=rank)
            self.sync_state = "ready"

        self._joining = (self._in_background("joining", join), cfg.timeout_s)
        return {"joining": True}

    def update_weights(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.receiver is None and self._joining is not None:
            # the trainer's rendezvous can return before this side's join thread has stored its receiver: the
            # first update may arrive in that gap, so it waits for the join (at most the group's time-out)
            thread, timeout_s = self._joining
            thread.join(timeout_s)
        if self.receiver is None:
            detail = f" (the join failed: {self.sync_error})" if self.sync_state == "failed" else ""
            raise ValueError(f"update_weights: no weight-sync group; POST /init_weight_sync first{detail}")

        def receive():
            with self.lock:
                version = self.receiver.receive(self.apply_weights)
                if version is not None:
                    self.weights_version = version
            self.sync_state = "ready"

        self._in_background("receiving", receive)
        return {"receiving": True}

    def close_weight_sync(self, body: dict[str, Any]) -> dict[str, Any]:
        self.receiver, self.sync_state, self._joining = None, "none", None
        return {"closed": True}


def build_app(server: RolloutServer, tokenizer, model_config, name: str, *, api_key: str | None = None) -> ServingApp:
    """The server's ASGI app: the rollout endpoints above and, given a tokenizer, the OpenAI API
    (``posttrain.serving.server``) on the same engine, whose generation and weight loading share ``server.lock``."""
    registry = CollectorRegistry()
    scheduler = None
    # vLLM's log-probs are the processed ones GRPO needs: vLLM sets that per engine
    api_options = {"logprobs_mode": "processed_logprobs"} if server.engine_name == "vllm" else {}
    if tokenizer is not None:
        scheduler = BatchScheduler(server.engine, lock=server.lock)
        api = OpenAIRoutes(tokenizer, server.engine, scheduler, name, model_config, registry=registry, **api_options)

    def post(method):
        async def endpoint(request: Request) -> JSONResponse:
            body = await read_json(request, 1 << 30)
            try:  # in a worker thread: generation and weight sync block
                return JSONResponse(await run_in_threadpool(method, body))
            except (ValueError, TypeError) as e:
                raise RequestError(str(e)) from e
        return endpoint

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(server.health())

    routes = [Route("/health", health, methods=["GET"])]
    routes += [Route(path, post(method), methods=["POST"]) for path, method in (
        ("/generate", server.generate), ("/init_weight_sync", server.init_weight_sync),
        ("/update_weights", server.update_weights), ("/close_weight_sync", server.close_weight_sync))]
    if scheduler is not None:
        routes += [route for route in api.routes() if route.path != "/health"]
    app = ServingApp(routes, api_key=api_key, registry=registry)
    app.scheduler = scheduler
    return app


def build_server(model_path: str, engine: str | None, dtype: str = "float32", gpu_memory_utilization: float = 0.9,
                 max_model_len: int = 4096, seed: int = 0) -> RolloutServer:
    """A rollout server for the checkpoint in ``model_path`` on ``engine`` (None: the default for its family); an
    ``EngineError`` naming ``--engine`` for an engine that cannot run it or cannot take weights."""
    from posttrain.rollout.registry import build_engine, choose_engine

    spec = choose_engine(engine, model_path, field="--engine", needs={"weight_sync"})
    if spec.name == "server":
        raise EngineError("--engine: a rollout server cannot forward to another server; use "
                          "native, transformers or vllm")
    rollout = build_engine(spec.name, model_path, field="--engine", needs={"weight_sync"}, dtype=dtype,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed)
    return RolloutServer(rollout, rollout.load_named_tensors, spec.name)


# -- the command ---------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (safetensors + config.json)")
    parser.add_argument("--engine", default=None,
                        help="native, transformers or vllm (default: native for the in-tree models, else "
                             "transformers; vllm on request)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--served-model-name", default=None,
                        help="model id for the OpenAI routes' clients (default: the folder name)")
    parser.add_argument("--api-key", default=os.environ.get("POSTTRAIN_API_KEY"),
                        help="every /v1 route wants 'Authorization: Bearer KEY' (default: $POSTTRAIN_API_KEY; none)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = build_server(args.model, args.engine, args.dtype, args.gpu_memory_utilization, args.max_model_len,
                              args.seed)
    except (EngineError, FileNotFoundError) as e:
        print(f"posttrain vllm-serve: {e}", file=sys.stderr)
        return 2
    from posttrain.serving.generation import read_model_config
    from posttrain.tokenizer import load_tokenizer

    name = args.served_model_name or Path(args.model).resolve().name
    try:
        tokenizer = load_tokenizer(args.model)
    except FileNotFoundError as e:  # token ids in and out still work: the rollout endpoints need no tokenizer
        tokenizer = None
        logger.info("no OpenAI routes: %s", e)
    app = build_app(server, tokenizer, read_model_config(args.model), name, api_key=args.api_key)
    http = HttpServer(app, args.host, args.port, name="posttrain-vllm-serve").start()
    print(f"posttrain vllm-serve: {server.engine_name} engine on {http.url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        http.close()
        if app.scheduler is not None:
            app.scheduler.close()
    return 0
