"""The Triton kernels compiled for a CUDA device: float32 against float64 references, bf16 against float32.

Skipped, with the reason, where there is no CUDA device (the CPU suite checks the same kernels through Triton's
interpreter). On the GPU, float32 ``tl.dot`` runs in TF32, hence the tolerances of a few 1e-3; bf16 inputs are
compared with the float32 run of the same kernels.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tests/gpu)"),
]

DEV = "cuda"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-3)).item()


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_KERNELS", "triton")


def ssd_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g, device=DEV) * s

    return {
        "x": r(batch, seqlen, nheads, headdim),
        "dt": r(batch, seqlen, nheads, s=0.5) - 2.0,
        "A": -(torch.rand(nheads, generator=g, device=DEV) * 4 + 1),
        "B": r(batch, seqlen, ngroups, dstate, s=0.3),
        "C": r(batch, seqlen, ngroups, dstate, s=0.3),
        "D": r(nheads),
        "z": r(batch, seqlen, nheads, headdim),
        "dt_bias": r(nheads, s=0.2),
    }


def run_ssd(inp, dtype, chunk, seq_idx=None, init=None, cu=None):
    leaves = {k: (v.to(dtype) if v.dim() > 1 else v).detach().requires_grad_() for k, v in inp.items()}
    init_leaf = init.detach().clone().requires_grad_() if init is not None else None
    import posttrain.kernels as K

    out, final, *rest = K.mamba_chunk_scan_combined(
        **leaves, chunk_size=chunk, initial_states=init_leaf, seq_idx=seq_idx, cu_seqlens=cu, dt_softplus=True,
        return_final_states=True, return_varlen_states=cu is not None,
    )  # fmt: skip
    g = torch.Generator(device=DEV).manual_seed(99)
    g_out = torch.randn(out.shape, generator=g, device=DEV)
    g_fin = torch.randn(final.shape, generator=g, device=DEV)
    torch.autograd.backward([out, final], [g_out.to(out.dtype), g_fin])
    grads = {k: v.grad.float() for k, v in leaves.items()}
    if init_leaf is not None:
        grads["initial_states"] = init_leaf.grad
    return out.float(), final, rest, grads


@pytest.mark.parametrize("packed", [False, True])
def test_ssd_fp32_matches_reference_and_bf16_matches_fp32(packed):
    from posttrain.kernels.ssd_reference import ssd_sequential_reference

    batch, seqlen = (1, 700) if packed else (2, 600)
    inp = ssd_inputs(batch, seqlen, 8, 64, 2, 64)
    seq = cu = None
    if packed:
        bounds = [0, 100, 357, 358, 700]
        cu = torch.tensor(bounds, dtype=torch.int32, device=DEV)
        seq = torch.zeros(1, seqlen, dtype=torch.int32, device=DEV)
        for i in range(len(bounds) - 1):
            seq[0, bounds[i] : bounds[i + 1]] = i
    init = torch.randn(batch, 8, 64, 64, device=DEV) * 0.1
    out32, fin32, rest32, g32 = run_ssd(inp, torch.float32, 256, seq, init, cu)
    ref = ssd_sequential_reference(**{k: v.double() for k, v in inp.items()}, initial_states=init.double(),
                                   seq_idx=seq, cu_seqlens=cu, dt_softplus=True)  # fmt: skip
    assert rel_err(out32, ref[0]) < 5e-3
    assert rel_err(fin32, ref[1]) < 5e-3
    if packed:
        assert rel_err(rest32[0], ref[2]) < 5e-3
    out16, fin16, _, g16 = run_ssd(inp, torch.bfloat16, 256, seq, init, cu)
    assert fin16.dtype == torch.float32
    assert rel_err(out16, out32) < 3e-2
    assert rel_err(fin16, fin32) < 3e-2
    for k in g32:
        assert rel_err(g16[k], g32[k]) < 5e-2, k


def test_ssd_triton_matches_torch_path_on_gpu(monkeypatch):
    import posttrain.kernels as K

    inp = ssd_inputs(2, 1000, 4, 32, 1, 128, seed=3)
    trit = K.mamba_chunk_scan_combined(**inp, chunk_size=128, dt_softplus=True)
    monkeypatch.setenv("POSTTRAIN_KERNELS", "torch")
    torch_out = K.mamba_chunk_scan_combined(**inp, chunk_size=128, dt_softplus=True)
    assert rel_err(trit, torch_out) < 5e-3


def test_ssd_matches_mamba_ssm_when_installed():
    ssd = pytest.importorskip("mamba_ssm.ops.triton.ssd_combined", reason="mamba_ssm is not installed")
    import posttrain.kernels as K

    inp = ssd_inputs(2, 900, 8, 64, 2, 64, seed=5)
    bf = {k: (v.bfloat16() if v.dim() > 1 else v) for k, v in inp.items()}
    ours = K.mamba_chunk_scan_combined(**bf, chunk_size=256, dt_softplus=True)
    theirs = ssd.mamba_chunk_scan_combined(**bf, chunk_size=256, dt_softplus=True)
    assert rel_err(ours.float(), theirs.float()) < 3e-2


def test_conv_rmsnorm_logprobs_bf16_vs_fp32():
    import posttrain.kernels as K

    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(2, 512, 1000, generator=g, device=DEV)
    w = torch.randn(512, 4, generator=g, device=DEV) * 0.3
    b = torch.randn(512, generator=g, device=DEV)
    seq = torch.zeros(2, 1000, dtype=torch.int32, device=DEV)
    seq[:, 400:] = 1

    def conv(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        out = K.causal_conv1d_fn(*leaves, seq_idx=seq, activation="silu")
        out.float().square().sum().backward()
        return out.float(), [t.grad.float() for t in leaves]

    o32, g32 = conv(torch.float32)
    ref = K.causal_conv1d_fn(x.double(), w.double(), b.double(), seq_idx=seq, activation="silu")
    assert rel_err(o32, ref) < 1e-5
    o16, g16 = conv(torch.bfloat16)
    assert rel_err(o16, o32) < 2e-2
    for a, r in zip(g16, g32):
        assert rel_err(a, r) < 3e-2

    h = torch.randn(4, 300, 1024, generator=g, device=DEV)
    zg = torch.randn(4, 300, 1024, generator=g, device=DEV)
    wn = torch.randn(1024, generator=g, device=DEV)

    def norm(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (h, wn, zg)]
        out = K.rms_norm_gated(leaves[0], leaves[1], leaves[2], group_size=256)
        out.float().square().sum().backward()
        return out.float(), [t.grad.float() for t in leaves]

    n32, gn32 = norm(torch.float32)
    n16, gn16 = norm(torch.bfloat16)
    assert rel_err(n16, n32) < 2e-2
    for a, r in zip(gn16, gn32):
        assert rel_err(a, r) < 3e-2

    hid = torch.randn(2048, 512, generator=g, device=DEV)
    lm = torch.randn(50_000, 512, generator=g, device=DEV) * 0.05
    tgt = torch.randint(0, 50_000, (2048,), device=DEV, generator=g)

    def logprobs(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (hid, lm)]
        lp, ent = K.fused_linear_logprobs(*leaves, tgt, temperature=0.9, return_entropy=True)
        (lp.sum() + 0.1 * ent.sum()).backward()
        return lp, ent, [t.grad.float() for t in leaves]

    lp32, ent32, gl32 = logprobs(torch.float32)
    ref_lp, ref_ent = K.naive_linear_logprobs(hid.double(), lm.double(), tgt, temperature=0.9)
    assert rel_err(lp32, ref_lp) < 5e-3 and rel_err(ent32, ref_ent) < 5e-3
    lp16, ent16, gl16 = logprobs(torch.bfloat16)
    assert lp16.dtype == torch.float32
    assert rel_err(lp16, lp32) < 2e-2 and rel_err(ent16, ent32) < 2e-2
    for a, r in zip(gl16, gl32):
        assert rel_err(a, r) < 5e-2


def test_decode_steps_match_torch_on_gpu():
    import posttrain.kernels as K
    from posttrain.kernels.conv1d_torch import causal_conv1d_update_torch
    from posttrain.kernels.ssd_torch import selective_state_update_torch

    g = torch.Generator(device=DEV).manual_seed(2)
    state = torch.randn(8, 16, 64, 128, generator=g, device=DEV)
    ref_state = state.clone()
    x = torch.randn(4, 16, 64, generator=g, device=DEV)
    dt = torch.randn(4, 16, 1, generator=g, device=DEV).expand(-1, -1, 64)
    A = -torch.rand(16, 1, 1, generator=g, device=DEV).expand(-1, 64, 128)
    B, C = torch.randn(4, 2, 128, generator=g, device=DEV), torch.randn(4, 2, 128, generator=g, device=DEV)
    idx = torch.tensor([5, 1, 7, 0], dtype=torch.int32, device=DEV)
    out = K.selective_state_update(state, x, dt, A, B, C, dt_softplus=True, state_batch_indices=idx)
    ref = selective_state_update_torch(ref_state, x, dt, A, B, C, dt_softplus=True, state_batch_indices=idx)
    assert rel_err(out, ref) < 1e-4 and rel_err(state, ref_state) < 1e-4

    conv_state = torch.randn(8, 256, 3, generator=g, device=DEV)
    ref_conv = conv_state.clone()
    xc = torch.randn(4, 256, generator=g, device=DEV)
    wc, bc = torch.randn(256, 4, generator=g, device=DEV), torch.randn(256, generator=g, device=DEV)
    out = K.causal_conv1d_update(xc, conv_state, wc, bc, activation="silu", conv_state_indices=idx)
    ref = causal_conv1d_update_torch(xc, ref_conv, wc, bc, activation="silu", conv_state_indices=idx)
    assert rel_err(out, ref) < 1e-5 and torch.equal(conv_state, ref_conv)
