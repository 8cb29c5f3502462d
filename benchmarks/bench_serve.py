"""Serving throughput: 16 concurrent HTTP requests to ``posttrain serve`` against transformers' generate answering
the same 16 requests one after another (what a server without batching does), same tiny weights, on the CPU.

Each request: a 64-token prompt, 64 new tokens, greedy, EOS ignored. The anchor runs in-process with no HTTP
(which favours it). Before any figure is printed, every request's text from the server is checked equal to the
anchor's. Also reported: the time of one request alone and of 8 concurrent ones (the issue asks for < 2x).
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from transformers import GraniteMoeHybridForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, machine

from posttrain.rollout.native import NativeEngine
from posttrain.serving.server import ModelServer
from posttrain.synthetic import arithmetic_corpus, tiny_model

REQUESTS, PROMPT, NEW = 16, 64, 64


def main() -> None:
    torch.set_num_threads(1)  # both sides alike; the shared 2-core machine thrashes with more
    tokenizer, model = tiny_model(steps=60)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        theirs = GraniteMoeHybridForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None
    stream = [t for text in arithmetic_corpus(200, seed=7) for t in tokenizer(text)["input_ids"]]
    prompts = [stream[i * PROMPT:(i + 1) * PROMPT] for i in range(REQUESTS)]

    def anchor() -> list[str]:
        texts = []
        with torch.no_grad():
            for prompt in prompts:
                out = theirs.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
                # the server skips special tokens by default, as vLLM does
                texts.append(tokenizer.decode(out[0, PROMPT:].tolist(), skip_special_tokens=True))
        return texts

    with ModelServer(tokenizer, NativeEngine(model), "tiny", model.config, port=0) as server, \
            httpx.Client(base_url=server.url + "/v1", timeout=600) as client:

        def request(prompt: list[int]) -> str:
            body = {"prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
            return client.post("/completions", json=body).json()["choices"][0]["text"]

        def ours(n: int = REQUESTS) -> list[str]:
            with ThreadPoolExecutor(n) as pool:
                return list(pool.map(request, prompts[:n]))

        assert ours() == anchor(), "greedy texts differ between posttrain serve and transformers"
        times: dict[str, list[float]] = {"ours": [], "anchor": [], "one": [], "eight": []}
        for _ in range(3):  # interleaved, best of 3
            for name, fn in (("ours", ours), ("anchor", anchor), ("one", lambda: request(prompts[0])),
                             ("eight", lambda: ours(8))):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    tokens = REQUESTS * NEW
    emit(f"serve_throughput_{REQUESTS}req_p{PROMPT}_n{NEW}", tokens / min(times["ours"]),
         tokens / min(times["anchor"]), "tokens/s", higher_is_better=True,
         anchor_is="transformers generate, one request at a time, no HTTP",
         one_request_s=round(min(times["one"]), 4), eight_concurrent_s=round(min(times["eight"]), 4),
         machine=machine())


if __name__ == "__main__":
    main()
