"""The native generation engine against transformers' generate and against fresh forward passes."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GraniteMoeHybridForCausalLM

from posttrain.models.hybrid import HybridCache
from posttrain.rollout import SamplingParams
from posttrain.rollout.native import NativeEngine, sample
from posttrain.rollout.native_decode import DecodePlan, prefill
from posttrain.synthetic import tiny_model

PROMPTS = [
    "Question: Ada has 12 apples and gets 7 more. How many apples does Ada have?\nAnswer:",
    "Question: Ben has 40 coins and gives away 13. How many coins are left?\nAnswer: Ben",
    "Question:",
]


@pytest.fixture(scope="module", params=["nope", "rope"])
def trained(request, tmp_path_factory):
    tokenizer, model = tiny_model(steps=40, rope=request.param == "rope")
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer, model, folder


def test_greedy_equals_transformers_generate(trained):
    tokenizer, model, folder = trained
    theirs = GraniteMoeHybridForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None  # EOS ignored on both sides (min_new_tokens would mask it instead)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ours = NativeEngine(model).generate(prompts, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))
    for prompt, completion in zip(prompts, ours):
        ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
        assert completion.token_ids == ref[0, len(prompt):].tolist()


def _kept_probability(probs: torch.Tensor, token: int, top_k: int, top_p: float) -> float:
    """The token's probability after top-k, then top-p (the smallest prefix of the top-k tokens, renormalised, that
    reaches top_p), renormalised."""
    order = torch.argsort(probs, descending=True).tolist()[:top_k or None]
    total = probs[order].sum().item()
    kept, mass = [], 0.0
    for v in order:
        if mass >= top_p:
            break
        kept.append(v)
        mass += probs[v].item() / total
    assert token in kept
    return probs[token].item() / probs[kept].sum().item()


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 20)])
def test_sampled_logprobs_equal_a_fresh_forward(trained, temperature, top_p, top_k):
    tokenizer, model, _ = trained
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=20, temperature=temperature, top_p=top_p, top_k=top_k, n=3, seed=3,
                            eos_token_id=tokenizer.eos_token_id)
    outs = NativeEngine(model).generate(prompts, params)
    assert [o.prompt_index for o in outs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for o in outs:
        p = prompts[o.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([p + o.token_ids])).logits[0].float()
        probs = torch.softmax(logits.double() / temperature, dim=-1)[len(p) - 1: -1]
        fresh = torch.tensor([math.log(_kept_probability(row, tok, top_k, top_p))
                              for row, tok in zip(probs, o.token_ids, strict=True)], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(o.logprobs, dtype=torch.float64), fresh, atol=1e-4, rtol=0)
        if o.finish_reason == "stop":
            assert o.token_ids[-1] == tokenizer.eos_token_id
            assert tokenizer.eos_token_id not in o.token_ids[:-1]
        else:
            assert len(o.token_ids) == 20


def test_seed_reproducible_and_samples_differ(trained):
    tokenizer, model, _ = trained
    prompt = [tokenizer(PROMPTS[0])["input_ids"]]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=4, seed=7)
    a = NativeEngine(model).generate(prompt, params)
    b = NativeEngine(model).generate(prompt, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert len({tuple(o.token_ids) for o in a}) > 1  # the G samples of one prompt are not copies


def test_finished_rows_stop_costing_compute(trained):
    tokenizer, model, _ = trained
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    engine = NativeEngine(model)
    stop_at = tokenizer(" ")["input_ids"] + tokenizer("\n")["input_ids"]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=stop_at))
    # each row goes through the model once per token it generated after the first (prefill gives the first)
    assert engine.stats.rows_forwarded == sum(len(o.token_ids) - 1 for o in outs)
    assert any(o.finish_reason == "stop" and len(o.token_ids) < 30 for o in outs)


def test_mamba_state_does_not_grow_with_generated_tokens(trained):
    _, model, _ = trained
    config = model.config
    short = HybridCache.allocate(config, 2, 10)
    long = HybridCache.allocate(config, 2, 10_000)
    for layer in config.mamba_layers:
        assert short.ssm[layer].shape == long.ssm[layer].shape
        assert short.conv[layer].shape == long.conv[layer].shape
    # only the attention layers' KV grows with the context
    grow = long.nbytes() - short.nbytes()
    per_token = 2 * 2 * len(config.attention_layers) * config.num_key_value_heads * config.head_dim * 4
    assert grow == per_token * (10_000 - 10)


def test_top_k_and_top_p_truncate_and_logprobs_are_of_the_renormalised_distribution():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = torch.log(torch.tensor([probs]))
    gen = torch.Generator().manual_seed(0)
    for params in (SamplingParams(top_k=2), SamplingParams(top_p=0.79)):  # both keep 0.5 and 0.3
        seen = set()
        for _ in range(200):
            tok, lp = sample(logits, params, gen)
            seen.add(int(tok))
            assert float(lp) == pytest.approx(math.log(probs[int(tok)] / 0.8), abs=1e-6)
        assert seen == {0, 1}


def test_top_p_is_measured_on_the_top_k_distribution_renormalised():
    """With both set, top-p's mass is counted on the top-k tokens' renormalised probabilities (as transformers'
    warpers and vLLM's sampler do), not on the full distribution: of 0.5 and 0.3, renormalised to 0.625 and 0.375,
    top_p = 0.6 keeps the first token alone (on the full distribution its 0.5 is short of 0.6, and both were kept)."""
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = torch.log(torch.tensor([probs] * 400))
    tokens, logprobs = sample(logits, SamplingParams(top_k=2, top_p=0.6), torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0}
    torch.testing.assert_close(logprobs, torch.zeros(400))  # the only token kept: probability 1
    # a naive float64 reference agrees on a random distribution
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 50, generator=g, dtype=torch.float64) * 2
    params = SamplingParams(top_k=10, top_p=0.7, temperature=0.8)
    tokens, logprobs = sample(row.repeat(300, 1).float(), params, g)
    probs64 = torch.softmax(row[0] / 0.8, -1)
    top = torch.argsort(probs64, descending=True)[:10].tolist()
    renormalised = probs64[top] / probs64[top].sum()
    kept, mass = [], 0.0
    for v, q in zip(top, renormalised.tolist()):
        if mass >= 0.7:
            break
        kept.append(v)
        mass += q
    assert set(tokens.tolist()) <= set(kept) and len(set(tokens.tolist())) > 1
    want = {v: math.log(probs64[v] / probs64[kept].sum()) for v in kept}
    for t, lp in zip(tokens.tolist(), logprobs.tolist()):
        assert lp == pytest.approx(want[t], abs=1e-5)


def test_bad_prompts_are_clear_errors(trained):
    _, model, _ = trained
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        NativeEngine(model).generate([[5], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 0 has token ids outside the vocabulary"):
        NativeEngine(model).generate([[10**6]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_generate_command_matches_the_engine(trained, capsys):
    import json

    from posttrain.cli import main

    tokenizer, model, folder = trained
    assert main(["generate", str(folder), PROMPTS[0], "--max-new-tokens", "12", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = tokenizer(PROMPTS[0])["input_ids"]
    expected = NativeEngine(model).generate([ids], SamplingParams(max_new_tokens=12, temperature=0,
                                                                   eos_token_id=tokenizer.eos_token_id))[0]
    assert row["text"] == tokenizer.decode(expected.token_ids, skip_special_tokens=True)
    assert row["num_tokens"] == len(expected.token_ids)


def test_equal_length_prompts_prefilled_as_a_batch_equal_transformers(trained):
    """Prompts of one length take the unpacked prefill and the unmasked attention step: still transformers'."""
    tokenizer, model, folder = trained
    theirs = GraniteMoeHybridForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None
    stream = [t for p in PROMPTS[:2] for t in tokenizer(p)["input_ids"]]
    prompts = [stream[i * 9:(i + 1) * 9] for i in range(4)]
    ours = NativeEngine(model).generate(prompts, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))
    ref = theirs.generate(torch.tensor(prompts), max_new_tokens=16, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)[:, 9:].tolist()
    assert [c.token_ids for c in ours] == ref


def test_step_callback_streams_every_token_and_can_abort_rows(trained):
    tokenizer, model, _ = trained
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=5, ignore_eos=True)
    seen: dict[int, list[int]] = {}
    last_reason: dict[int, str | None] = {}

    def record(step):
        for row, token, reason in zip(step.rows, step.token_ids, step.finish_reasons):
            assert last_reason.get(row) is None, f"row {row} got a token after it finished"
            seen.setdefault(row, []).append(token)
            last_reason[row] = reason

    outs = NativeEngine(model).generate(prompts, params, on_step=record)
    assert {row: o.token_ids for row, o in enumerate(outs)} == seen  # the same tokens, as they came
    assert all(last_reason[row] == "length" for row in range(len(outs)))
    # the callback asks rows 1 and 4 to stop after their third token: they leave the batch there
    steps = []

    def abort_after_three(step):
        steps.append(step)
        return [1, 4] if len(steps) == 3 else None

    greedy = SamplingParams(max_new_tokens=12, temperature=0, n=2, ignore_eos=True)  # rows independent of others
    outs = NativeEngine(model).generate(prompts, greedy)
    engine = NativeEngine(model)
    outs_aborted = engine.generate(prompts, greedy, on_step=abort_after_three)
    for row, (full, cut) in enumerate(zip(outs, outs_aborted)):
        if row in (1, 4):
            assert cut.finish_reason == "abort" and cut.token_ids == full.token_ids[:3]
        else:
            assert cut.token_ids == full.token_ids and cut.finish_reason == "length"
    assert engine.stats.rows_forwarded == 4 * 11 + 2 * 2  # 4 rows for all 11 steps, the aborted two for 2
    assert all(len(s.rows) == 4 for s in steps[3:])


def _odd_config(**overrides):
    """A small hybrid exercising every decode-plan branch: RoPE, experts, biases, two B/C groups with a per-group
    gated norm, a step-size limit, Granite's multipliers."""
    from posttrain.models.hybrid import preset

    fields = {"vocab_size": 97, "position_embedding_type": "rope", "mamba_n_groups": 2, "attention_bias": True,
              "mamba_proj_bias": True, "time_step_limit": (0.01, 0.5), "embedding_multiplier": 3.0,
              "residual_multiplier": 0.7, "logits_scaling": 2.5, "attention_multiplier": 0.3,
              "initializer_range": 0.2, "tie_word_embeddings": False}
    fields.update(overrides)
    return preset("tiny-moe", **fields)


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("overrides", [{}, {"mamba_n_groups": 1, "num_local_experts": 0,
                                            "position_embedding_type": None, "time_step_limit": (0.0, float("inf"))}],
                         ids=["rope-moe-groups-biases", "dense-nope"])
def test_decode_plan_steps_equal_a_fresh_forward(fold, overrides):
    """The decode plan (folded weights or the parameters as they are) gives a fresh forward's logits, with prompts of
    different lengths (rows at different positions: the masked attention step)."""
    from posttrain.models.hybrid import HybridForCausalLM

    torch.manual_seed(0)
    model = HybridForCausalLM(_odd_config(**overrides)).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that folding them in is tested
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight", "bias")):
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.3)
    prompts = [[5, 17, 3, 44, 9, 1, 60], [8, 2, 71], [33, 12, 90, 4, 4]]
    new = torch.tensor([[7, 11, 13, 2], [19, 23, 29, 31], [37, 41, 43, 47]])
    cache = HybridCache.allocate(model.config, len(prompts), 16)
    plan = DecodePlan(model, fold=fold)
    assert plan.fold == fold
    with torch.no_grad():
        prefill(model, prompts, cache)
        stepped = [plan.step(new[:, t], cache) for t in range(new.shape[1])]
        for i, p in enumerate(prompts):
            full = model(torch.tensor([p + new[i].tolist()])).logits[0, len(p):]
            torch.testing.assert_close(torch.stack([s[i] for s in stepped]), full, atol=1e-4, rtol=1e-4)


def test_weights_changed_between_generate_calls_are_used():
    """The RL loop updates the weights in place between generate() calls: the next call must decode with them,
    including weights the plan folds (norms) and a change made through ``.data`` (no version counter bump)."""
    from posttrain.models.hybrid import HybridForCausalLM

    torch.manual_seed(0)
    model = HybridForCausalLM(_odd_config(num_local_experts=0, position_embedding_type=None)).eval()
    engine = NativeEngine(model)
    prompts = [[5, 17, 3, 44, 9], [8, 2, 71, 6, 6]]
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)

    def assert_fresh(outs):  # greedy from the current weights: each token is the fresh forward's argmax
        for prompt, o in zip(prompts, outs):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + o.token_ids])).logits[0, len(prompt) - 1:-1]
            assert o.token_ids == logits.argmax(-1).tolist()
            torch.testing.assert_close(torch.tensor(o.logprobs), torch.log_softmax(logits, -1).max(-1).values,
                                       atol=1e-4, rtol=0)

    before = engine.generate(prompts, params)
    assert_fresh(before)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = -model(torch.tensor([prompts[0] + before[0].token_ids])).logits.float().std()
    loss.backward()
    optimizer.step()  # in place, as in the RL loop
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.data.mul_(3.0)  # folded into in_proj by the plan
        model.model.norm.weight.data.mul_(-1.0)  # folded into the LM head
    after = engine.generate(prompts, params)
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    assert_fresh(after)
