"""The pure-torch kernel paths (the CPU path of posttrain.kernels) against float64 references and transformers.

Each torch path is checked against an independent oracle: the SSD against the token-by-token recurrence, the conv
against a direct sum, the decode steps against the whole-sequence functions, the norm against transformers'
GraniteMoeHybridRMSNormGated, the fused log-probs against full logits; forward values and gradients.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import posttrain.kernels as K
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from posttrain.kernels import ssd_reference
from posttrain.kernels.ssd_common import prepare_dt
from posttrain.kernels.ssd_reference import ssd_sequential_reference

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_KERNELS", "torch")


def seq_idx_from(cu: list[int]) -> torch.Tensor:
    seq = torch.zeros(1, cu[-1], dtype=torch.int32)
    for i in range(len(cu) - 1):
        seq[0, cu[i] : cu[i + 1]] = i
    return seq


def ssd_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype=F64, seed=0, d_per_channel=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return {
        "x": r(batch, seqlen, nheads, headdim),
        "dt": r(batch, seqlen, nheads) * 0.5,
        "A": -(torch.rand(nheads, generator=g, dtype=dtype) + 0.3),
        "B": r(batch, seqlen, ngroups, dstate),
        "C": r(batch, seqlen, ngroups, dstate),
        "D": r(nheads, headdim) if d_per_channel else r(nheads),
        "z": r(batch, seqlen, nheads, headdim),
        "dt_bias": r(nheads) * 0.2,
    }


SSD_CASES = [
    # (batch, seqlen, nheads, headdim, ngroups, dstate, chunk, packed cu_seqlens or None, initial states)
    (2, 29, 4, 3, 2, 5, 8, None, False),
    (1, 37, 4, 3, 2, 5, 8, [0, 5, 6, 20, 37], True),
    (1, 40, 6, 2, 3, 4, 16, [0, 16, 33, 40], False),
    (2, 13, 2, 4, 1, 3, 32, None, True),
]


@pytest.mark.parametrize("case", SSD_CASES)
def test_ssd_torch_matches_sequential_recurrence(case):
    batch, seqlen, nheads, headdim, ngroups, dstate, chunk, cu, with_init = case
    inp = ssd_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, d_per_channel=seqlen == 40)
    seq = seq_idx_from(cu) if cu else None
    cu_t = torch.tensor(cu if cu else [0, seqlen], dtype=torch.int32)
    init = torch.randn(batch, nheads, headdim, dstate, dtype=F64) if with_init else None
    kw = {"initial_states": init, "seq_idx": seq, "dt_softplus": True, "dt_limit": (0.0, 3.0)}
    ref_out, ref_final, ref_varlen = ssd_sequential_reference(**inp, cu_seqlens=cu_t if batch == 1 else None, **kw)
    res = K.mamba_chunk_scan_combined(
        **inp,
        chunk_size=chunk,
        cu_seqlens=cu_t if batch == 1 else None,
        return_final_states=True,
        return_varlen_states=batch == 1,
        **kw,
    )
    assert rel_err(res[0], ref_out) < 1e-12
    assert rel_err(res[1], ref_final) < 1e-12
    if batch == 1:
        assert res[2].shape == (len(cu_t) - 1, nheads, headdim, dstate)
        assert rel_err(res[2], ref_varlen) < 1e-12
    if cu:
        # the packed row equals the sequences run one by one
        for i in range(len(cu) - 1):
            part = {k: (v[:, cu[i] : cu[i + 1]] if v.dim() > 1 and v.shape[1] == seqlen else v) for k, v in inp.items()}
            one = ssd_sequential_reference(
                **part, initial_states=init if i == 0 else None, dt_softplus=True, dt_limit=(0.0, 3.0)
            )
            assert rel_err(res[0][:, cu[i] : cu[i + 1]], one[0]) < 1e-12
            assert rel_err(res[2][i : i + 1], one[1]) < 1e-12


@pytest.mark.parametrize("case", [SSD_CASES[0], SSD_CASES[1]])
def test_ssd_torch_gradients_match_reference(case):
    batch, seqlen, nheads, headdim, ngroups, dstate, chunk, cu, with_init = case
    inp = ssd_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, seed=1)
    seq = seq_idx_from(cu) if cu else None
    init = torch.randn(batch, nheads, headdim, dstate, dtype=F64) if with_init else None
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]
    gout = torch.randn(batch, seqlen, nheads, headdim, dtype=F64)
    gfin = torch.randn(batch, nheads, headdim, dstate, dtype=F64)

    def grads(fn):
        leaves = {k: inp[k].clone().requires_grad_() for k in names}
        init_leaf = init.clone().requires_grad_() if init is not None else None
        out, fin = fn(leaves, init_leaf)
        torch.autograd.backward([out, fin], [gout, gfin])
        result = {k: v.grad for k, v in leaves.items()}
        if init_leaf is not None:
            result["initial_states"] = init_leaf.grad
        return result

    ref = grads(lambda t, i: ssd_sequential_reference(**t, initial_states=i, seq_idx=seq, dt_softplus=True)[:2])
    ours = grads(
        lambda t, i: K.mamba_chunk_scan_combined(
            **t, chunk_size=chunk, initial_states=i, seq_idx=seq, dt_softplus=True, return_final_states=True
        )
    )
    for k in ref:
        assert rel_err(ours[k], ref[k]) < 1e-10, k


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    "softplus,limit",
    [(False, (0.0, float("inf"))), (False, (-1.0, float("inf"))), (False, (0.0, 1.0)), (True, (0.0, float("inf"))),
     (True, (0.1, 0.8))],
)  # fmt: skip
def test_shared_step_size_matches_the_oracles(with_bias, softplus, limit):
    """The step size both production SSD paths import equals the oracle's own, written apart from it."""
    g = torch.Generator().manual_seed(0)
    dt = torch.randn(2, 7, 3, generator=g, dtype=F64) * 2  # negative values too: only softplus makes dt positive
    bias = torch.randn(3, generator=g, dtype=F64) if with_bias else None
    assert torch.equal(prepare_dt(dt, bias, softplus, limit), ssd_reference.prepare_dt(dt, bias, softplus, limit))


def test_oracle_imports_nothing_it_checks():
    """The oracle imports only torch: it shares no code with ssd_common, ssd_torch or ssd_triton."""
    tree = ast.parse(Path(ssd_reference.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    assert modules <= {"__future__", "torch", "torch.nn.functional"}, modules


def test_no_kernel_module_imports_the_oracle():
    """The oracle is for tests only: no module of posttrain.kernels (its public API included) imports it."""
    for path in Path(K.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        names |= {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
        assert not any("ssd_reference" in name for name in names), path
    assert "ssd_sequential_reference" not in K.__all__


def test_ssd_torch_float32_and_bf16_inputs():
    inp = ssd_inputs(1, 50, 4, 8, 2, 8, dtype=torch.float32, seed=3)
    ref_out, ref_final, _ = ssd_sequential_reference(**inp, dt_softplus=True)
    out, final = K.mamba_chunk_scan_combined(**inp, chunk_size=16, dt_softplus=True, return_final_states=True)
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    assert rel_err(out, ref_out) < 1e-5 and rel_err(final, ref_final) < 1e-5
    bf = {k: v.bfloat16() if v.dim() > 1 else v for k, v in inp.items()}
    out_bf, final_bf = K.mamba_chunk_scan_combined(**bf, chunk_size=16, dt_softplus=True, return_final_states=True)
    assert out_bf.dtype == torch.bfloat16 and final_bf.dtype == torch.float32  # states stay float32
    assert rel_err(out_bf, ref_out) < 3e-2


def test_ssd_torch_matches_transformers_torch_path():
    tf = pytest.importorskip("transformers.models.granitemoehybrid.modeling_granitemoehybrid")
    inp = ssd_inputs(2, 70, 4, 8, 2, 16, dtype=torch.float32, seed=4)
    init = torch.randn(2, 4, 8, 16)
    theirs, their_final = (
        tf.mamba2_chunk_scan.__wrapped__(
            inp["x"],
            inp["dt"],
            inp["A"],
            inp["B"],
            inp["C"],
            chunk_size=32,
            D=inp["D"],
            dt_bias=inp["dt_bias"],
            initial_states=init,
            dt_softplus=True,
            dt_limit=(0.0, 4.0),
            return_final_states=True,
        )
        if hasattr(tf.mamba2_chunk_scan, "__wrapped__")
        else tf.mamba2_chunk_scan(
            inp["x"],
            inp["dt"],
            inp["A"],
            inp["B"],
            inp["C"],
            chunk_size=32,
            D=inp["D"],
            dt_bias=inp["dt_bias"],
            initial_states=init,
            dt_softplus=True,
            dt_limit=(0.0, 4.0),
            return_final_states=True,
        )
    )
    ours, our_final = K.mamba_chunk_scan_combined(
        inp["x"],
        inp["dt"],
        inp["A"],
        inp["B"],
        inp["C"],
        chunk_size=32,
        D=inp["D"],
        dt_bias=inp["dt_bias"],
        initial_states=init,
        dt_softplus=True,
        dt_limit=(0.0, 4.0),
        return_final_states=True,
    )
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(our_final, their_final) < 1e-5


@pytest.mark.parametrize("with_indices", [False, True])
def test_selective_state_update_steps_equal_whole_sequence(with_indices):
    batch, seqlen, nheads, headdim, ngroups, dstate = 3, 9, 4, 3, 2, 5
    inp = ssd_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype=torch.float32, seed=5, d_per_channel=True)
    init = torch.randn(batch, nheads, headdim, dstate)
    ref_out, ref_final, _ = ssd_sequential_reference(**inp, initial_states=init, dt_softplus=True)
    slots = torch.tensor([4, 0, 2], dtype=torch.int32)
    pool = torch.zeros(6, nheads, headdim, dstate)
    if with_indices:
        pool[slots.long()] = init
        state = pool
    else:
        state = init.clone()
    A = inp["A"][:, None, None].expand(nheads, headdim, dstate)
    outs = []
    for t in range(seqlen):
        outs.append(
            K.selective_state_update(
                state,
                inp["x"][:, t],
                inp["dt"][:, t, :, None].expand(-1, -1, headdim),
                A,
                inp["B"][:, t],
                inp["C"][:, t],
                D=inp["D"],
                z=inp["z"][:, t],
                dt_bias=inp["dt_bias"][:, None].expand(-1, headdim),
                dt_softplus=True,
                state_batch_indices=slots if with_indices else None,
            )
        )
    assert rel_err(torch.stack(outs, 1), ref_out) < 1e-5
    final = pool[slots.long()] if with_indices else state
    assert rel_err(final, ref_final) < 1e-5
    if with_indices:
        untouched = [i for i in range(6) if i not in slots.tolist()]
        assert pool[untouched].abs().max() == 0


def conv_reference(x, weight, bias, seq_idx, initial_states, activation):
    """out[t] = b + sum_k w[k] x[t - (W-1) + k], the history from initial_states, taps in other sequences zero."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    out = torch.zeros(batch, dim, seqlen, dtype=F64)
    for b in range(batch):
        for t in range(seqlen):
            acc = bias.double().clone() if bias is not None else torch.zeros(dim, dtype=F64)
            for k in range(width):
                src = t - (width - 1) + k
                if src >= 0:
                    if seq_idx is not None and seq_idx[b, src] != seq_idx[b, t]:
                        continue
                    acc += weight[:, k].double() * x[b, :, src].double()
                elif initial_states is not None and (seq_idx is None or seq_idx[b, t] == seq_idx[b, 0]):
                    acc += weight[:, k].double() * initial_states[b, :, width - 1 + src].double()
            out[b, :, t] = acc
    return F.silu(out) if activation else out


@pytest.mark.parametrize(
    "packed,with_init,activation",
    [(False, False, None), (True, False, "silu"), (False, True, "swish"), (True, True, "silu")],
)
def test_causal_conv1d_matches_direct_sum(packed, with_init, activation):
    batch, dim, seqlen, width = (1 if packed else 2), 5, 17, 4
    x = torch.randn(batch, dim, seqlen, dtype=F64, requires_grad=True)
    w = torch.randn(dim, width, dtype=F64, requires_grad=True)
    b = torch.randn(dim, dtype=F64, requires_grad=True)
    seq = seq_idx_from([0, 2, 9, 17]) if packed else None
    init = torch.randn(batch, dim, width - 1, dtype=F64) if with_init else None
    ref = conv_reference(x, w, b, seq, init, activation)
    out, final = K.causal_conv1d_fn(
        x, w, b, seq_idx=seq, initial_states=init, return_final_states=True, activation=activation
    )
    assert rel_err(out, ref) < 1e-12
    assert torch.equal(final, x[:, :, -(width - 1) :].detach())
    g = torch.randn_like(ref)
    ours = torch.autograd.grad(out, (x, w, b), g)
    theirs = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(ours, theirs):
        assert rel_err(a, r) < 1e-12
    buf = torch.empty(batch, dim, width - 1, dtype=F64)
    _, final2 = K.causal_conv1d_fn(x.detach(), w.detach(), final_states_out=buf)
    assert final2 is buf and torch.equal(buf, final)


@pytest.mark.parametrize("ring", [False, True])
def test_causal_conv1d_update_steps_equal_whole_sequence(ring):
    batch, dim, seqlen, width, state_len = 3, 6, 11, 4, (5 if ring else 3)
    x = torch.randn(batch, dim, seqlen)
    w, b = torch.randn(dim, width), torch.randn(dim)
    full = K.causal_conv1d_fn(x, w, b, activation="silu")
    slots = torch.tensor([2, 0, 3], dtype=torch.int32)
    pool = torch.zeros(4, dim, state_len)
    steps = []
    for t in range(seqlen):
        kw = {"cache_seqlens": torch.full((batch,), t, dtype=torch.int32)} if ring else {}
        steps.append(K.causal_conv1d_update(x[:, :, t], pool, w, b, activation="silu", conv_state_indices=slots, **kw))
    assert rel_err(torch.stack(steps, -1), full) < 1e-6
    assert pool[1].abs().max() == 0
    if not ring:
        assert torch.equal(pool[slots.long()], x[:, :, -state_len:])
        # several tokens at once continue from the state like one at a time
        state = torch.zeros(batch, dim, state_len)
        first = K.causal_conv1d_update(x[:, :, :4], state, w, b)
        rest = K.causal_conv1d_update(x[:, :, 4:], state, w, b)
        assert rel_err(torch.cat([first, rest], -1), K.causal_conv1d_fn(x, w, b)) < 1e-6


@pytest.mark.parametrize("group_size", [None, 4])
def test_rms_norm_gated_matches_transformers(group_size):
    tf = pytest.importorskip("transformers.models.granitemoehybrid.modeling_granitemoehybrid")
    dim = 16
    norm = tf.GraniteMoeHybridRMSNormGated(dim, group_size=group_size or dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, dim, requires_grad=True)
    z = torch.randn(2, 5, dim, requires_grad=True)
    ref = norm(x, z)
    ours = K.rms_norm_gated(x, norm.weight, z, eps=1e-6, group_size=group_size)
    assert rel_err(ours, ref) < 1e-6
    g = torch.randn_like(ref)
    for a, r in zip(
        torch.autograd.grad(ours, (x, z, norm.weight), g), torch.autograd.grad(ref, (x, z, norm.weight), g)
    ):
        assert rel_err(a, r) < 1e-5
    # norm_before_gate: the gate multiplies the normalised value
    after = K.rms_norm_gated(x, norm.weight, z, group_size=group_size, norm_before_gate=True)
    assert rel_err(after, K.rms_norm_gated(x, norm.weight, None, group_size=group_size) * F.silu(z)) < 1e-6


@pytest.mark.parametrize("chunk", [3, 64])
def test_fused_linear_logprobs_match_full_logits(chunk):
    n, h, v = 11, 8, 37
    hidden = torch.randn(n, h, dtype=F64, requires_grad=True)
    weight = torch.randn(v, h, dtype=F64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[[2, 7]] = -100
    kw = {"temperature": 0.7, "logits_scaling": 1.3}
    ref_lp, ref_ent = K.naive_linear_logprobs(hidden.double(), weight.double(), targets, **kw)
    lp, ent = K.fused_linear_logprobs(hidden, weight, targets, chunk_size=chunk, return_entropy=True, **kw)
    assert lp.shape == (n,) and ent.shape == (n,)
    assert rel_err(lp, ref_lp) < 1e-12 and rel_err(ent, ref_ent) < 1e-12
    assert lp[2] == 0 and ent[7] == 0
    g_lp, g_ent = torch.randn(n, dtype=F64), torch.randn(n, dtype=F64)
    ours = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hidden, weight))
    theirs = torch.autograd.grad((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum(), (hidden, weight))
    for a, r in zip(ours, theirs):
        assert rel_err(a, r) < 1e-10
    # log-probs alone (no entropy in the graph), and only hidden needing a gradient
    w_frozen = weight.detach()
    lp2 = K.fused_linear_logprobs(hidden, w_frozen, targets, chunk_size=chunk, **kw)
    (gh,) = torch.autograd.grad((lp2 * g_lp).sum(), (hidden,))
    (rh,) = torch.autograd.grad((K.naive_linear_logprobs(hidden, w_frozen, targets, **kw)[0] * g_lp).sum(), (hidden,))
    assert rel_err(gh, rh) < 1e-10


def test_fused_linear_logprobs_gradcheck_and_leading_dims():
    hidden = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=F64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3))

    def fn(h, w):
        lp, ent = K.fused_linear_logprobs(h, w, targets, temperature=1.5, chunk_size=4, return_entropy=True)
        return lp, ent

    assert fn(hidden, weight)[0].shape == (2, 3)
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    seqlen=st.integers(1, 70),
    ngroups=st.sampled_from([1, 2]),
    heads_per_group=st.integers(1, 3),
    headdim=st.integers(1, 5),
    dstate=st.integers(1, 6),
    chunk=st.sampled_from([4, 7, 16, 64]),
    with_init=st.booleans(),
    cuts=st.lists(st.integers(1, 69), max_size=4),
    seed=st.integers(0, 10_000),
)
def test_ssd_torch_randomised_shapes(batch, seqlen, ngroups, heads_per_group, headdim, dstate, chunk, with_init,
                                     cuts, seed):  # fmt: skip
    nheads = ngroups * heads_per_group
    inp = ssd_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, seed=seed, d_per_channel=seed % 2 == 0)
    cu = sorted({0, seqlen, *[c for c in cuts if c < seqlen]}) if batch == 1 and cuts else None
    seq = seq_idx_from(cu) if cu else None
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu else None
    init = torch.randn(batch, nheads, headdim, dstate, dtype=F64) if with_init else None
    kw = {"initial_states": init, "seq_idx": seq, "cu_seqlens": cu_t, "dt_softplus": True}
    ref = ssd_sequential_reference(**inp, **kw)
    res = K.mamba_chunk_scan_combined(**inp, chunk_size=chunk, return_final_states=True,
                                      return_varlen_states=cu is not None, **kw)  # fmt: skip
    assert rel_err(res[0], ref[0]) < 1e-10 and rel_err(res[1], ref[1]) < 1e-10
    if cu:
        assert rel_err(res[2], ref[2]) < 1e-10


def test_dispatch_env_var(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("POSTTRAIN_KERNELS")
    assert K.backend_for(cpu) == "torch"
    monkeypatch.setenv("POSTTRAIN_KERNELS", "torch")
    assert K.backend_for(cpu) == "torch"
    monkeypatch.setenv("POSTTRAIN_KERNELS", "cuda")
    with pytest.raises(ValueError, match="POSTTRAIN_KERNELS"):
        K.backend_for(cpu)
    if K.triton_available():
        # forcing triton on CPU without the interpreter is a clear error, not a driver crash
        monkeypatch.setenv("POSTTRAIN_KERNELS", "triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            K.rms_norm_gated(torch.ones(2, 4), torch.ones(4))


def test_public_functions_are_their_torch_paths_dispatched(monkeypatch):
    """Each public kernel has its torch path's signature and documentation, and finds the tensor it dispatches on
    whether it comes by position or by keyword (selective_state_update's is its second argument, x)."""
    from posttrain.kernels.ssd_torch import selective_state_update_torch, ssd_chunked_torch

    assert inspect.signature(K.mamba_chunk_scan_combined) == inspect.signature(ssd_chunked_torch)
    assert K.mamba_chunk_scan_combined.__doc__ == ssd_chunked_torch.__doc__
    assert K.selective_state_update.__name__ == "selective_state_update"
    assert inspect.signature(K.selective_state_update) == inspect.signature(selective_state_update_torch)
    if not K.triton_available():
        return
    monkeypatch.setenv("POSTTRAIN_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the triton path on CPU refuses: the dispatch took it
    state, x, dt = torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3), torch.ones(1, 2, 3)
    A, B = -torch.ones(2, 3, 4), torch.ones(1, 1, 4)
    for args, kwargs in (((state, x, dt, A, B, B), {}), ((state,), {"x": x, "dt": dt, "A": A, "B": B, "C": B})):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            K.selective_state_update(*args, **kwargs)
    with pytest.raises(TypeError, match="'x'"):
        K.selective_state_update(state, dt=dt, A=A, B=B, C=B)


def test_package_imports_without_triton(tmp_path):
    """The torch paths work where triton cannot be imported (CPU machines without it)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, posttrain.kernels as K\n"
        "assert not K.triton_available()\n"
        "x = torch.randn(1, 8, 2, 3); dt = torch.rand(1, 8, 2); A = -torch.ones(2); B = torch.randn(1, 8, 1, 4)\n"
        "print(K.mamba_chunk_scan_combined(x, dt, A, B, B, 4).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "POSTTRAIN_KERNELS"}
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 8, 2, 3])" in res.stdout
