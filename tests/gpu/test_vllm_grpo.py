"""The colocated vLLM rollout engine of ``posttrain grpo`` (CUDA + ``pip install posttrain[vllm]``).

Checks: after a weight sync every vLLM parameter holds the trainer's values (each one changes when the trainer's
weights change, and those vLLM keeps under the checkpoint's own names are equal to them); the log-probabilities
vLLM returns for its samples agree with the trainer's (fused kernel on packed rows) within a stated bound,
mean |delta| < 0.02 nats in float32; tokens/s and the mismatch are printed. Skipped, with the reason, without
CUDA or vLLM.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tests/gpu)"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install 'posttrain[vllm]'"),
]

MEAN_ABS_LOGPROB_BOUND = 0.02


@pytest.fixture(scope="module")
def setup():
    from posttrain.rollout.vllm import VllmEngine
    from posttrain.synthetic import tiny_model

    tok, model = tiny_model(steps=30)
    model = model.cuda().float()
    engine = VllmEngine.for_policy(model, tok, gpu_memory_utilization=0.2, max_model_len=256, sleep_mode=True)
    engine.sync_weights(model)
    yield model, tok, engine
    engine.close()


def test_sync_pushes_every_tensor(setup):
    model, _, engine = setup
    before = {k: v.detach().clone() for k, v in engine.named_parameters().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    engine.sync_weights(model)
    after = engine.named_parameters()
    trainer = model.state_dict()
    unchanged = [k for k, v in after.items() if torch.equal(v, before[k])]
    assert not unchanged, f"vLLM parameters the sync did not reach: {unchanged}"
    same_name = [k for k in after if k in trainer]
    for k in same_name:
        torch.testing.assert_close(after[k].float(), trainer[k].float(), rtol=0, atol=0, msg=k)
    assert sum(v.numel() for v in after.values()) >= sum(v.numel() for k, v in trainer.items() if "lm_head" not in k)


def test_logprob_mismatch_under_bound(setup):
    from posttrain.grpo.collect import Rollout
    from posttrain.rollout import SamplingParams

    model, tok, engine = setup
    prompts = [tok.encode(f"Question: Ada has {a} apples and gets {a + 3} more.") for a in range(16)]
    start = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=32, temperature=1.0, n=4, seed=0,
                                                   eos_token_id=tok.eos_token_id))
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    deltas = []
    with torch.no_grad():
        for o in outs:
            r = Rollout(0, o.prompt_index, prompts[o.prompt_index], o.token_ids, o.logprobs, o.finish_reason, {}, None)
            seq = r.prompt_ids + r.completion_ids
            ids = torch.tensor(seq[:-1], device="cuda")[None]
            hidden = model(ids, return_logits=False).hidden_states[0, len(r.prompt_ids) - 1:]
            lp = model.token_logprobs(hidden, torch.tensor(r.completion_ids, device="cuda"))
            deltas.append((lp.double().cpu() - torch.tensor(o.logprobs, dtype=torch.float64)).abs())
    delta = torch.cat(deltas)
    print(f"vLLM rollout: {tokens / seconds:.0f} tokens/s; trainer-vLLM |logprob delta| mean {delta.mean():.2e}, "
          f"max {delta.max():.2e}")
    assert delta.mean() < MEAN_ABS_LOGPROB_BOUND
