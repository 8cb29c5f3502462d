"""Mamba-2 SSD forward+backward on CPU: our chunked torch path vs transformers' torch path for GraniteMoeHybrid.

The hybrid model trains on CPU through ``posttrain.kernels``' torch path; it must be at least as fast as the path
transformers takes without mamba_ssm (``mamba2_chunk_scan`` in modeling_granitemoehybrid). Same inputs, float32,
forward and backward, median of a few runs, both in this process one after the other. Prints one JSON line per
shape: {"name", "ours", "anchor", "unit", "ratio"} with ratio = anchor / ours. It never downloads anything.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["POSTTRAIN_KERNELS"] = "torch"
    import posttrain.kernels as K
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid as tf

    tf_scan = getattr(tf.mamba2_chunk_scan, "__wrapped__", tf.mamba2_chunk_scan)
    # (batch, seqlen, nheads, headdim, ngroups, dstate, chunk): a tiny test model, a small model, a longer row
    shapes = [(4, 512, 8, 32, 1, 64, 64), (2, 1024, 16, 64, 1, 128, 256), (1, 4096, 32, 64, 1, 128, 256)]
    for shape in shapes:
        ours, theirs = _bench_shape(K.mamba_chunk_scan_combined, tf_scan, shape, args.repeats)
        b, T, h, p, _, n, Q = shape
        print(json.dumps({"name": f"ssd_cpu_fwd_bwd_time_b{b}_L{T}_h{h}_p{p}_n{n}_q{Q}", "ours": ours,
                          "anchor": theirs, "unit": "s", "ratio": theirs / ours}))  # fmt: skip


def _bench_shape(ours_fn, tf_scan, shape: tuple[int, ...], repeats: int) -> tuple[float, float]:
    import torch

    b, T, h, p, g, n, Q = shape
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(b, T, h, p, generator=gen), torch.randn(b, T, h, generator=gen),
              -torch.rand(h, generator=gen) - 0.5, torch.randn(b, T, g, n, generator=gen),
              torch.randn(b, T, g, n, generator=gen), torch.randn(h, generator=gen),
              torch.randn(h, generator=gen)]  # fmt: skip
    for t in leaves:
        t.requires_grad_()
    x, dt, A, B, C, D, bias = leaves

    def run(fn):
        def step():
            fn().sum().backward()
            for t in leaves:
                t.grad = None

        return step

    ours = _median_time(run(lambda: ours_fn(x, dt, A, B, C, Q, D=D, dt_bias=bias, dt_softplus=True)), repeats)
    theirs = _median_time(run(lambda: tf_scan(x, dt, A, B, C, chunk_size=Q, D=D, dt_bias=bias, dt_softplus=True)),
                          repeats)  # fmt: skip
    return ours, theirs


if __name__ == "__main__":
    main()
