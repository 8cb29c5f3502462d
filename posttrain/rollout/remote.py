"""The client of a rollout server (``posttrain vllm-serve``): the engine protocol over HTTP, and the trainer's side of
the weight sync (``posttrain.rollout.weight_sync``).

``generate`` posts token-id prompts and sampling parameters to ``/generate`` and gets the engine's completions
back (prompt-major, the sampler's log-probabilities, finish reasons). ``init_weight_sync`` asks the server to join
the trainer's broadcast group and hosts its rendezvous; ``sync_weights(model)`` broadcasts the trainer's tensors
and waits until the server reports the new version. A server that does not answer is a ``RuntimeError`` naming the
server and the path; a sync that fails or times out is a ``WeightSyncError``. The server's side is
``posttrain.grpo.server``. This module never changes a model's weights.
"""

from __future__ import annotations

import logging
import time

import torch

from posttrain.families import checkpoint_state
from posttrain.rollout.base import Capabilities, Completion, SamplingParams
from posttrain.rollout.weight_sync import SyncGroupConfig, WeightSender, WeightSyncError

logger = logging.getLogger(__name__)

# the SamplingParams fields that cross the wire, as the server reads them
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "n", "stop_token_ids", "eos_token_id",
                   "ignore_eos", "seed")
# request features sent only when set (plain numbers the server's SamplingParams takes), so that a server that
# predates them still serves every plain request
OPTIONAL_FIELDS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_tokens": 0}
# features the wire does not carry: their results (reports) or values (a compiled grammar; token-id keys, which
# JSON turns into strings) have no place in the server's request or answer
REFUSED_FIELDS = ("logit_bias", "logprobs", "constraint")


class RemoteEngine:
    """The rollout-engine interface over HTTP to a ``posttrain vllm-serve``, and the trainer's side of the sync."""

    name = "server"
    capabilities = Capabilities(weight_sync=True, close=True)

    def __init__(self, url: str, timeout_s: float = 600.0):
        import httpx

        self.url = url.rstrip("/")
        self.client = httpx.Client(timeout=timeout_s)
        self.sender: WeightSender | None = None

    def _request(self, method: str, path: str, body: dict | None = None):
        """One HTTP call to the server; a connection failure is a RuntimeError naming the server and the path."""
        import httpx

        try:
            return self.client.request(method, self.url + path, json=body)
        except httpx.HTTPError as e:
            raise RuntimeError(f"rollout server {self.url}{path}: {type(e).__name__}: {e}") from None

    def _post(self, path: str, body: dict) -> dict:
        r = self._request("POST", path, body)
        if r.status_code != 200:
            raise RuntimeError(f"rollout server {self.url}{path}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    def health(self) -> dict:
        return self._request("GET", "/health").json()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        refused = [k for k in REFUSED_FIELDS if getattr(params, k) is not None]
        if refused:
            raise ValueError(f"{', '.join(refused)}: the server engine cannot carry "
                             f"{'this field' if len(refused) == 1 else 'these fields'} to a rollout server; use an "
                             "in-process engine (native, transformers) or vllm")
        sampling = {k: getattr(params, k) for k in SAMPLING_FIELDS}
        sampling.update({k: getattr(params, k) for k, default in OPTIONAL_FIELDS.items()
                         if getattr(params, k) != default})
        out = self._post("/generate", {"prompts": prompts, "sampling": sampling})
        return [Completion(c["prompt_index"], c["token_ids"], c["logprobs"], c["finish_reason"])
                for c in out["completions"]]

    def init_weight_sync(self, cfg: SyncGroupConfig) -> None:
        """Ask the server to join, then host the rendezvous (waits at most cfg.timeout_s for it)."""
        self._post("/init_weight_sync", {"host": cfg.host, "port": cfg.port, "world_size": cfg.world_size,
                                         "rank": 1, "backend": cfg.backend, "timeout_s": cfg.timeout_s})
        self.sender = WeightSender(cfg)

    @torch.no_grad()
    def sync_weights(self, model) -> int:
        """Broadcast ``model``'s tensors to the server; returns when it reports them applied."""
        if self.sender is None:
            raise WeightSyncError("sync_weights before init_weight_sync")
        self._post("/update_weights", {})
        sent = self.sender.send(checkpoint_state(model).items())  # by checkpoint names, LoRA adapters applied
        # the server acknowledged the weights inside the collective; its version number is set just after: wait
        # for it, so that /health never reports the old version once this returns
        deadline = time.monotonic() + self.sender.cfg.timeout_s
        while self.health().get("weights_version") != self.sender.version:
            if time.monotonic() > deadline:
                raise WeightSyncError(f"rollout server {self.url}: applied the weights but did not report version "
                                      f"{self.sender.version} within {self.sender.cfg.timeout_s:g}s")
            time.sleep(0.005)
        return sent

    def close(self) -> None:
        if self.sender is not None:
            try:
                self._post("/update_weights", {})
                self.sender.close()
            except (WeightSyncError, RuntimeError) as e:
                logger.warning("closing the weight sync: %s", e)
            self.sender = None
        self.client.close()
