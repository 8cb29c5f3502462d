"""Mamba-2 SSD forward+backward on a CUDA device: our Triton kernels vs transformers' torch path and mamba_ssm.

Times ``mamba_chunk_scan_combined`` (forward and backward, bf16 inputs, H100-sized Mamba-2 shapes: 64 heads of 64
channels, state 128, one group, chunk 256) at sequence lengths 2K to 64K, beside transformers' torch path for
GraniteMoeHybrid (the path a user without mamba_ssm gets) and mamba_ssm's fused kernels where importable. Also
measures the card's ceilings (a large bf16 matmul for FLOP/s, a large copy for bandwidth) and reports the SSD's
achieved FLOP/s and bandwidth as fractions of them. Prints one JSON line per measure: {"name", "ours", "anchor",
"unit", "ratio"} with ratio = anchor / ours for times. Without CUDA it exits with a message and status 2; it never
downloads anything.
"""

from __future__ import annotations

import argparse
import json
import sys


def _timeit(fn, repeats: int) -> float:
    import torch

    fn()  # compile / warm up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _ceilings() -> tuple[float, float]:
    """Measured bf16 matmul FLOP/s and device-to-device copy bytes/s of this card."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = _timeit(lambda: a @ a, 10)
    flops = 2 * 8192**3 / t
    src = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = _timeit(lambda: dst.copy_(src), 10)
    return flops, 2 * src.numel() / t


def _ssd_cost(seqlen: int, nheads: int, headdim: int, dstate: int, ngroups: int, chunk: int) -> tuple[float, float]:
    """Matmul FLOPs and minimum bytes of one forward+backward (backward counted as twice the forward's FLOPs)."""
    per_token_head = 2 * (chunk * headdim + 2 * headdim * dstate) + 2 * chunk * dstate * ngroups / nheads
    fwd = seqlen * nheads * per_token_head
    bytes_io = seqlen * (2 * nheads * headdim + 2 * ngroups * dstate + nheads) * 2 * 3  # read+write, fwd+bwd
    return 3 * fwd, bytes_io


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="2048,8192,16384,32768,65536")
    parser.add_argument("--nheads", type=int, default=64)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--dstate", type=int, default=128)
    parser.add_argument("--ngroups", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_kernels_gpu: no CUDA device here; this benchmark needs one (the CPU tests check correctness).")
        sys.exit(2)
    import posttrain.kernels as K
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid as tf

    tf_scan = getattr(tf.mamba2_chunk_scan, "__wrapped__", tf.mamba2_chunk_scan)
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as mamba_ssm_scan
    except ImportError:
        mamba_ssm_scan = None
        print("mamba_ssm not importable: that anchor is left out", file=sys.stderr)

    flops_ceiling, bw_ceiling = _ceilings()
    print(f"{torch.cuda.get_device_name()}: {flops_ceiling / 1e12:.0f} TFLOP/s bf16 matmul, "
          f"{bw_ceiling / 1e9:.0f} GB/s copy (measured)", file=sys.stderr)  # fmt: skip
    for seqlen in (int(s) for s in args.lengths.split(",")):
        for line in _bench_length(seqlen, args, K.mamba_chunk_scan_combined, tf_scan, mamba_ssm_scan,
                                  flops_ceiling, bw_ceiling):  # fmt: skip
            print(json.dumps(line))


def _bench_length(seqlen, args, ours_fn, tf_scan, mamba_ssm_scan, flops_ceiling, bw_ceiling) -> list[dict]:
    import torch

    h, p, n, g, Q = args.nheads, args.headdim, args.dstate, args.ngroups, args.chunk
    gen = torch.Generator(device="cuda").manual_seed(0)

    def leaf(*shape, s=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, device="cuda", generator=gen) * s).to(dtype).requires_grad_()

    x, z = leaf(1, seqlen, h, p), leaf(1, seqlen, h, p)
    dt = leaf(1, seqlen, h, s=0.5)
    A = (-torch.rand(h, device="cuda", generator=gen) * 4 - 1).requires_grad_()
    B, C = leaf(1, seqlen, g, n, s=0.3), leaf(1, seqlen, g, n, s=0.3)
    D, dt_bias = leaf(h, dtype=torch.float32), leaf(h, s=0.2, dtype=torch.float32)
    grad = torch.randn(1, seqlen, h, p, device="cuda", dtype=torch.bfloat16, generator=gen)

    def step(fn):
        def run():
            out = fn()
            out.backward(grad.to(out.dtype))
            for t in (x, z, dt, A, B, C, D, dt_bias):
                t.grad = None

        return run

    lines = []
    ours = _timeit(step(lambda: ours_fn(x, dt, A, B, C, Q, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)), args.repeats)
    flops, nbytes = _ssd_cost(seqlen, h, p, n, g, Q)
    lines.append({"name": f"ssd_fwd_bwd_achieved_tflops_L{seqlen}", "ours": flops / ours / 1e12,
                  "anchor": flops_ceiling / 1e12, "unit": "TFLOP/s", "ratio": flops / ours / flops_ceiling})  # fmt: skip
    lines.append({"name": f"ssd_fwd_bwd_achieved_bandwidth_L{seqlen}", "ours": nbytes / ours / 1e9,
                  "anchor": bw_ceiling / 1e9, "unit": "GB/s", "ratio": nbytes / ours / bw_ceiling})  # fmt: skip
    silu = torch.nn.functional.silu
    anchors = {
        "transformers_torch": lambda: (
            tf_scan(x, dt, A, B, C, chunk_size=Q, D=D, dt_bias=dt_bias, dt_softplus=True) * silu(z)
        )
    }
    if mamba_ssm_scan is not None:
        anchors["mamba_ssm"] = lambda: mamba_ssm_scan(x, dt, A, B, C, Q, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    for name, fn in anchors.items():
        try:
            theirs = _timeit(step(fn), args.repeats)
        except torch.cuda.OutOfMemoryError:
            print(f"{name} ran out of memory at L={seqlen}", file=sys.stderr)
            torch.cuda.empty_cache()
            continue
        lines.append({"name": f"ssd_fwd_bwd_time_vs_{name}_L{seqlen}", "ours": ours, "anchor": theirs, "unit": "s",
                      "ratio": theirs / ours})  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
