"""The Triton kernels on CPU through Triton's interpreter, against float64 references, forward and backward.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so in an ordinary pytest session this module
only holds two drivers that run this same file again in a fresh ``python -m pytest`` with the variable set (the
fast cases by default, the randomised hypothesis cases under ``-m slow``). In that child process the cases below
run: float32 inputs (the interpreter has no bf16 ``tl.dot``), norm-relative error against float64 of at most 1e-4
forward and 1e-3 for every gradient, the gradients coming from the kernels' own backward.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FWD_TOL, GRAD_TOL = 1e-4, 1e-3


def _run_interpreted(marker: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", POSTTRAIN_KERNELS="triton")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-m", marker,
           "-o", "addopts=--import-mode=importlib", "--timeout=1200"]  # fmt: skip
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, tail
    return tail


if not INTERPRETED:

    def test_triton_kernels_under_interpreter():
        tail = _run_interpreted("not slow")
        passed = re.search(r"(\d+) passed", tail)
        assert passed and int(passed.group(1)) >= 19, tail
        assert "failed" not in tail and "skipped" not in tail, tail

    @pytest.mark.slow
    def test_triton_kernels_under_interpreter_randomised():
        tail = _run_interpreted("slow")
        passed = re.search(r"(\d+) passed", tail)
        assert passed and int(passed.group(1)) >= 1, tail

else:
    import posttrain.kernels as K
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from posttrain.kernels.conv1d_torch import causal_conv1d_torch, causal_conv1d_update_torch
    from posttrain.kernels.logprobs_torch import naive_linear_logprobs
    from posttrain.kernels.rmsnorm_torch import rms_norm_gated_torch
    from posttrain.kernels.ssd_reference import ssd_sequential_reference
    from posttrain.kernels.ssd_torch import selective_state_update_torch

    F64 = torch.float64

    def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
        """Norm-relative error; a reference of norm below 1e-3 (an exactly zero gradient, say a length-1 sequence's
        dA) is compared absolutely, against 1e-3, so float32 rounding around zero does not count as an error."""
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-3)).item()

    @pytest.fixture(autouse=True)
    def triton_backend(monkeypatch):
        monkeypatch.setenv("POSTTRAIN_KERNELS", "triton")
        assert K.backend_for(torch.zeros(1)) == "triton"

    def seq_from(cu: list[int]) -> torch.Tensor:
        seq = torch.zeros(1, cu[-1], dtype=torch.int32)
        for i in range(len(cu) - 1):
            seq[0, cu[i] : cu[i + 1]] = i
        return seq

    def check_ssd(batch, seqlen, nheads, headdim, ngroups, dstate, chunk, cu, with_init, d_per_channel, seed):
        g = torch.Generator().manual_seed(seed)

        def r(*shape, s=1.0):
            return (torch.randn(*shape, generator=g) * s).requires_grad_()

        inp = {
            "x": r(batch, seqlen, nheads, headdim),
            "dt": r(batch, seqlen, nheads, s=0.5),
            "A": (-(torch.rand(nheads, generator=g) + 0.3)).requires_grad_(),
            "B": r(batch, seqlen, ngroups, dstate),
            "C": r(batch, seqlen, ngroups, dstate),
            "D": r(nheads, headdim) if d_per_channel else r(nheads),
            "z": r(batch, seqlen, nheads, headdim),
            "dt_bias": r(nheads, s=0.2),
        }
        init = r(batch, nheads, headdim, dstate) if with_init else None
        seq = seq_from(cu) if cu else None
        cu_t = torch.tensor(cu, dtype=torch.int32) if cu else None
        kw = {"seq_idx": seq, "dt_softplus": True, "dt_limit": (0.0, 3.0)}
        res = K.mamba_chunk_scan_combined(
            **inp, chunk_size=chunk, initial_states=init, cu_seqlens=cu_t, return_final_states=True,
            return_varlen_states=cu is not None, **kw,
        )  # fmt: skip
        ref_inp = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
        ref_init = init.detach().double().requires_grad_() if init is not None else None
        ref = ssd_sequential_reference(**ref_inp, initial_states=ref_init, cu_seqlens=cu_t, **kw)
        assert rel_err(res[0], ref[0]) <= FWD_TOL
        assert rel_err(res[1], ref[1]) <= FWD_TOL
        if cu is not None:
            assert rel_err(res[2], ref[2]) <= FWD_TOL
        g_out = torch.randn(res[0].shape, generator=g)
        g_fin = torch.randn(res[1].shape, generator=g)
        torch.autograd.backward([res[0], res[1]], [g_out, g_fin])
        torch.autograd.backward([ref[0], ref[1]], [g_out.double(), g_fin.double()])
        for k, leaf in inp.items():
            assert rel_err(leaf.grad, ref_inp[k].grad) <= GRAD_TOL, k
        if init is not None:
            assert rel_err(init.grad, ref_init.grad) <= GRAD_TOL

    @pytest.mark.parametrize(
        "case",
        [
            # batch, seqlen, nheads, headdim, ngroups, dstate, chunk, cu_seqlens, initial states, D per channel
            (2, 45, 4, 8, 2, 16, 16, None, True, False),
            (1, 53, 4, 8, 2, 16, 16, [0, 5, 6, 20, 53], True, True),
            (1, 70, 2, 16, 1, 8, 32, [0, 31, 32, 70], False, False),
            (2, 20, 6, 4, 3, 20, 16, None, False, True),
        ],
    )
    def test_ssd_triton_matches_float64_reference(case):
        check_ssd(*case, seed=sum(case[:7]))

    def test_selective_state_update_triton():
        batch, nheads, headdim, ngroups, dstate = 3, 4, 8, 2, 16
        g = torch.Generator().manual_seed(7)
        state = torch.randn(5, nheads, headdim, dstate, generator=g)
        args = (
            torch.randn(batch, nheads, headdim, generator=g),
            torch.randn(batch, nheads, 1, generator=g).expand(-1, -1, headdim),
            (-torch.rand(nheads, 1, 1, generator=g)).expand(-1, headdim, dstate),
            torch.randn(batch, ngroups, dstate, generator=g),
            torch.randn(batch, ngroups, dstate, generator=g),
        )
        kw = {
            "D": torch.randn(nheads, headdim, generator=g),
            "z": torch.randn(batch, nheads, headdim, generator=g),
            "dt_bias": torch.randn(nheads, 1, generator=g).expand(-1, headdim),
            "dt_softplus": True,
            "state_batch_indices": torch.tensor([3, 0, 1], dtype=torch.int32),
        }
        ref_state = state.double()
        ref = selective_state_update_torch(ref_state, *(a.double() for a in args), **{
            k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()})  # fmt: skip
        out = K.selective_state_update(state, *args, **kw)
        assert rel_err(out, ref) <= FWD_TOL
        assert rel_err(state, ref_state) <= FWD_TOL
        # single-head shapes (no head axis) as mamba_ssm accepts
        st1 = torch.randn(2, 8, 16, generator=g)
        x1, dt1 = torch.randn(2, 8, generator=g), torch.rand(2, 8, generator=g)
        a1, b1, c1 = -torch.rand(8, 16, generator=g), torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
        ref1_state = st1.double()
        ref1 = selective_state_update_torch(ref1_state, x1.double(), dt1.double(), a1.double(), b1.double(),
                                            c1.double())  # fmt: skip
        assert rel_err(K.selective_state_update(st1, x1, dt1, a1, b1, c1), ref1) <= FWD_TOL
        assert rel_err(st1, ref1_state) <= FWD_TOL

    @pytest.mark.parametrize(
        "packed,with_init,activation,width",
        [(False, False, None, 4), (True, False, "silu", 4), (False, True, "silu", 3), (True, True, "swish", 4)],
    )
    def test_causal_conv1d_triton_forward_backward(packed, with_init, activation, width):
        batch, dim, seqlen = (1 if packed else 2), 40, 83
        g = torch.Generator().manual_seed(11)
        x = torch.randn(batch, dim, seqlen, generator=g, requires_grad=True)
        w = torch.randn(dim, width, generator=g, requires_grad=True)
        b = torch.randn(dim, generator=g, requires_grad=True)
        init = torch.randn(batch, dim, width - 1, generator=g, requires_grad=True) if with_init else None
        seq = seq_from([0, 2, 40, 70, 83]) if packed else None
        out, final = K.causal_conv1d_fn(x, w, b, seq_idx=seq, initial_states=init, return_final_states=True,
                                        activation=activation)  # fmt: skip
        leaves = [t for t in (x, w, b, init) if t is not None]
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref_init = ref_leaves[3] if with_init else None
        ref = causal_conv1d_torch(ref_leaves[0], ref_leaves[1], ref_leaves[2], seq_idx=seq, initial_states=ref_init,
                                  activation=activation)  # fmt: skip
        assert rel_err(out, ref) <= FWD_TOL
        assert torch.equal(final, x[:, :, -(width - 1) :].detach())
        g_out = torch.randn(out.shape, generator=g)
        grads = torch.autograd.grad(out, leaves, g_out)
        ref_grads = torch.autograd.grad(ref, ref_leaves, g_out.double())
        for name, a, r in zip(["x", "w", "b", "init"], grads, ref_grads):
            assert rel_err(a, r) <= GRAD_TOL, name

    @pytest.mark.parametrize("ring,seqlen", [(False, 1), (False, 3), (True, 1), (True, 2)])
    def test_causal_conv1d_update_triton(ring, seqlen):
        batch, dim, width, state_len = 3, 40, 4, 5
        g = torch.Generator().manual_seed(13)
        pool = torch.randn(4, dim, state_len, generator=g)
        ref_pool = pool.double()
        x = torch.randn(batch, dim, seqlen, generator=g)
        w, b = torch.randn(dim, width, generator=g), torch.randn(dim, generator=g)
        idx = torch.tensor([2, 0, 3], dtype=torch.int32)
        lens = torch.tensor([0, 4, 9], dtype=torch.int32) if ring else None
        out = K.causal_conv1d_update(x, pool, w, b, activation="silu", cache_seqlens=lens, conv_state_indices=idx)
        ref = causal_conv1d_update_torch(x.double(), ref_pool, w.double(), b.double(), activation="silu",
                                         cache_seqlens=lens, conv_state_indices=idx)  # fmt: skip
        assert rel_err(out, ref) <= FWD_TOL
        assert rel_err(pool, ref_pool) <= FWD_TOL
        x1 = torch.randn(batch, dim, generator=g)
        out1 = K.causal_conv1d_update(x1, pool, w, b, conv_state_indices=idx)
        assert out1.shape == (batch, dim)
        ref1 = causal_conv1d_update_torch(x1.double(), ref_pool, w.double(), b.double(), conv_state_indices=idx)
        assert rel_err(out1, ref1) <= FWD_TOL
        assert rel_err(pool, ref_pool) <= FWD_TOL

    @pytest.mark.parametrize("group_size,gate_after,with_z", [(None, False, True), (8, False, True),
                                                              (8, True, True), (None, False, False)])  # fmt: skip
    def test_rms_norm_gated_triton_forward_backward(group_size, gate_after, with_z):
        g = torch.Generator().manual_seed(17)
        x = torch.randn(3, 5, 24, generator=g, requires_grad=True)
        z = torch.randn(3, 5, 24, generator=g, requires_grad=True) if with_z else None
        w = torch.randn(24, generator=g, requires_grad=True)
        out = K.rms_norm_gated(x, w, z, eps=1e-5, group_size=group_size, norm_before_gate=gate_after)
        leaves = [t for t in (x, w, z) if t is not None]
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref = rms_norm_gated_torch(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_z else None, eps=1e-5,
                                   group_size=group_size, norm_before_gate=gate_after)  # fmt: skip
        assert rel_err(out, ref) <= FWD_TOL
        g_out = torch.randn(out.shape, generator=g)
        for name, a, r in zip(["x", "w", "z"], torch.autograd.grad(out, leaves, g_out),
                              torch.autograd.grad(ref, ref_leaves, g_out.double())):  # fmt: skip
            assert rel_err(a, r) <= GRAD_TOL, name

    @pytest.mark.parametrize("with_entropy", [True, False])
    def test_fused_linear_logprobs_triton(with_entropy):
        n, h, v = 13, 16, 300
        g = torch.Generator().manual_seed(19)
        hidden = torch.randn(n, h, generator=g, requires_grad=True)
        weight = (torch.randn(v, h, generator=g) * 0.5).requires_grad_()
        targets = torch.randint(0, v, (n,), generator=g)
        targets[4] = -100
        kw = {"temperature": 0.8, "logits_scaling": 1.5}
        lp, ent = K.fused_linear_logprobs(hidden, weight, targets, chunk_size=5, return_entropy=True, **kw)
        hd, wd = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        ref_lp, ref_ent = naive_linear_logprobs(hd, wd, targets, **kw)
        assert lp.dtype == torch.float32 and lp[4] == 0 and ent[4] == 0
        assert rel_err(lp, ref_lp) <= FWD_TOL and rel_err(ent, ref_ent) <= FWD_TOL
        g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
        loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if with_entropy else 0.0)
        ref_loss = (ref_lp * g_lp.double()).sum() + ((ref_ent * g_ent.double()).sum() if with_entropy else 0.0)
        for a, r in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref_loss, (hd, wd))):
            assert rel_err(a, r) <= GRAD_TOL

    @pytest.mark.slow
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        batch=st.integers(1, 2),
        seqlen=st.integers(1, 80),
        ngroups=st.sampled_from([1, 2]),
        heads_per_group=st.integers(1, 3),
        headdim=st.sampled_from([4, 8, 16]),
        dstate=st.sampled_from([8, 16, 24]),
        chunk=st.sampled_from([16, 32]),
        with_init=st.booleans(),
        cuts=st.lists(st.integers(1, 79), max_size=4),
        seed=st.integers(0, 10_000),
    )
    def test_ssd_triton_randomised_shapes(batch, seqlen, ngroups, heads_per_group, headdim, dstate, chunk,
                                          with_init, cuts, seed):  # fmt: skip
        cu = None
        if batch == 1 and cuts:
            cu = sorted({0, seqlen, *[c for c in cuts if c < seqlen]})
        check_ssd(batch, seqlen, ngroups * heads_per_group, headdim, ngroups, dstate, chunk, cu, with_init,
                  seed % 2 == 0, seed)  # fmt: skip
