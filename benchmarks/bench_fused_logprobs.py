"""Peak memory and time of per-token log-probabilities, forward and backward: the fused chunked path vs full logits.

The workload is GRPO's policy pass: 8 x 1024 tokens, Granite's vocabulary (100,352) and hidden size 1536, float32
on CPU, ``loss = sum(logprob * advantage)``, backward to the hidden states and the LM-head weight. Each side runs
in a fresh subprocess so neither inherits the other's allocator state; the extra memory is the peak resident set
after the backward minus the resident set once the inputs exist. The anchor is the naive path (``hidden @ W.T``,
``log_softmax``, gather), which is what the fused path must beat on memory (target: at most 10% of its extra memory)
at no more than 1.5x its time. liger-kernel's fused linear cross-entropy is tried as a second anchor; on a machine
without a GPU its Triton kernels cannot run, and the benchmark says so.

Prints one JSON line per measure: {"name", "ours", "anchor", "unit", "ratio"} with ratio = anchor / ours. It must
never write outside a temporary folder and never download anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(side: str, tokens: int, vocab: int, hidden: int, chunk: int | None) -> dict:
    """Run one side in this process (a fresh child) and return its time and extra peak memory."""
    import torch

    torch.manual_seed(0)
    h = torch.empty(tokens, hidden).normal_().requires_grad_()
    w = torch.empty(vocab, hidden).normal_(std=0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    adv = torch.empty(tokens).normal_()
    base = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if side == "fused":
        from posttrain.kernels import fused_linear_logprobs

        logp = fused_linear_logprobs(h, w, targets, chunk_size=chunk or None)
    elif side == "naive":
        logits = h @ w.T
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
        del logits
    else:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        logp = -liger_fused_linear_cross_entropy(h, w, targets, reduction="none")
    (logp * adv).sum().backward()
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if peak_before > base + (64 << 20):
        raise RuntimeError("input creation left a peak above the baseline: the measure would be wrong")
    return {"seconds": elapsed, "extra_bytes": max(0, peak - base), "grad_norm": float(h.grad.norm())}


def _child(side: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, POSTTRAIN_KERNELS="torch")
    cmd = [sys.executable, __file__, "--child", side, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--chunk", str(args.chunk)]  # fmt: skip
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"error": (res.stderr or res.stdout).strip().splitlines()[-1] if (res.stderr or res.stdout) else "?"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8 * 1024)
    parser.add_argument("--vocab", type=int, default=100_352)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--chunk", type=int, default=0, help="tokens per chunk of the fused path (0: its default)")
    parser.add_argument("--child", choices=["fused", "naive", "liger"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child, args.tokens, args.vocab, args.hidden, args.chunk)))
        return

    naive = _child("naive", args)
    fused = _child("fused", args)
    for name, side in (("naive", naive), ("fused", fused)):
        if "error" in side:
            raise SystemExit(f"the {name} side failed: {side['error']}")
    shape = f"{args.tokens}x{args.vocab}x{args.hidden}"
    rel = abs(fused["grad_norm"] - naive["grad_norm"]) / naive["grad_norm"]
    if rel > 1e-3:
        raise SystemExit(f"the two sides disagree: hidden grad norms {fused['grad_norm']} vs {naive['grad_norm']}")
    lines = [
        {"name": f"fused_logprobs_fwd_bwd_extra_peak_memory_{shape}", "ours": fused["extra_bytes"] / 2**20,
         "anchor": naive["extra_bytes"] / 2**20, "unit": "MiB"},
        {"name": f"fused_logprobs_fwd_bwd_time_{shape}", "ours": fused["seconds"], "anchor": naive["seconds"],
         "unit": "s"},
    ]  # fmt: skip
    liger = _child("liger", args)
    if "error" in liger:
        print(f"liger-kernel anchor not measured: {liger['error']}", file=sys.stderr)
    else:
        lines.append({"name": f"fused_logprobs_vs_liger_extra_peak_memory_{shape}", "ours": fused["extra_bytes"] / 2**20,
                      "anchor": liger["extra_bytes"] / 2**20, "unit": "MiB"})  # fmt: skip
        lines.append({"name": f"fused_logprobs_vs_liger_time_{shape}", "ours": fused["seconds"],
                      "anchor": liger["seconds"], "unit": "s"})  # fmt: skip
    for line in lines:
        line["ratio"] = line["anchor"] / line["ours"] if line["ours"] else float("inf")
        print(json.dumps(line))


if __name__ == "__main__":
    main()
