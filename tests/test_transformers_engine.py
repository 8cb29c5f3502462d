"""The transformers engine against transformers' own ``generate`` and against fresh teacher-forced forward passes.

Tiny models built by transformers itself (random init, float32, vocab matched to the in-tree tokenizer): Llama,
Qwen2 (tied embeddings), Granite with its multipliers away from 1, Mistral with a sliding window shorter than the
prompts, and the Mamba layouts (Mamba, the Granite 4.0-H hybrid, Falcon-H1). Expected values never come from the
engine under test: greedy tokens from ``model.generate`` on each prompt alone, log-probabilities from one forward
over prompt + completion with a naive float64 temperature / top-k / top-p, the sampling distribution from the
prompt's logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV32Config,
    FalconH1Config,
    GraniteConfig,
    GraniteMoeHybridConfig,
    LlamaConfig,
    MambaConfig,
    MistralConfig,
    Qwen2Config,
)

from posttrain.rollout.base import Engine, EngineError, SamplingParams
from posttrain.rollout.transformers_engine import TransformersEngine
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer

ATTENTION = {
    "llama": LlamaConfig,
    "qwen2": lambda **kw: Qwen2Config(tie_word_embeddings=True, **kw),
    "granite": lambda **kw: GraniteConfig(embedding_multiplier=4.0, residual_multiplier=0.5,
                                          attention_multiplier=0.2, logits_scaling=2.0, **kw),
}
OTHER_LAYOUTS = {
    "mistral-sliding": lambda **kw: MistralConfig(sliding_window=6, **kw),  # prompts are longer than the window
    "granitemoehybrid": lambda **kw: GraniteMoeHybridConfig(
        layer_types=["mamba", "attention", "mamba"], num_hidden_layers=3, mamba_n_heads=4, mamba_d_head=32,
        mamba_d_state=16, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=16, num_local_experts=0,
        shared_intermediate_size=128, position_embedding_type="nope",
        **{k: v for k, v in kw.items() if k != "num_hidden_layers"}),
    "mamba": lambda **kw: MambaConfig(state_size=8, **{k: v for k, v in kw.items() if k not in (
        "intermediate_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}),
    "falcon-h1": lambda **kw: FalconH1Config(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
                                             mamba_chunk_size=16, **kw),
}
LENGTHS = (7, 13, 2, 20)  # different lengths: left padding, each row must equal its prompt alone


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(arithmetic_corpus(300), vocab_size=300)


def tiny(family: str, tok, seed: int = 0, attn: str = "sdpa", **kw):
    torch.manual_seed(seed)
    cfg = {**ATTENTION, **OTHER_LAYOUTS}[family](
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **kw)
    if family != "mamba":  # no attention layers
        cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    model.generation_config.eos_token_id = None  # each call says whether EOS counts
    return model


def prompts_of(tok, lengths=LENGTHS, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in lengths]


def reference_greedy(model, prompt: list[int], new: int, eos: int | None) -> list[int]:
    """transformers' generate on one prompt alone."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def reference_logprobs(model, prompt, completion, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Teacher-forced: one forward over prompt + completion; each sampled token's log-probability under the
    temperature-scaled distribution, truncated naively (top-k: the k largest; top-p: the smallest most-likely set
    reaching top_p) and renormalised, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].double()
    out = []
    for row, token in zip(logits, completion):
        probs = torch.softmax(row / temperature, dim=-1)
        kept = set(range(len(probs)))
        if top_k:
            kept = set(probs.argsort(descending=True)[:top_k].tolist())
        if top_p < 1.0:
            chosen, mass = set(), 0.0
            for t in probs.argsort(descending=True).tolist():
                if mass >= top_p:
                    break
                chosen.add(t)
                mass += probs[t].item()
            kept &= chosen
        assert token in kept, "a token outside the truncated set was sampled"
        out.append(torch.log(probs[token] / sum(probs[t] for t in kept)).item())
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(ATTENTION))
def test_greedy_equals_generate_on_prompts_of_different_lengths(family, attn, tok):
    model = tiny(family, tok, attn=attn)
    prompts = prompts_of(tok)
    engine = TransformersEngine(model)
    out = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True,
                                                  eos_token_id=tok.eos_token_id))
    expected = [reference_greedy(model, p, 24, None) for p in prompts]
    assert [c.token_ids for c in out] == expected
    assert all(c.finish_reason == "length" for c in out)
    # EOS honoured: make a token that prompt 0's greedy completion reaches at step 5 the EOS; its row stops there,
    # the others run on (or stop where they reach it), each exactly as generate on that prompt alone
    eos = expected[0][5]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0, eos_token_id=eos))
    for p, c in zip(prompts, out):
        ref = reference_greedy(model, p, 24, eos)
        assert c.token_ids == ref
        assert c.finish_reason == ("stop" if ref[-1] == eos else "length")
    assert out[0].token_ids[-1] == eos and len(out[0].token_ids) == expected[0].index(eos) + 1
    # prompts of one length: nothing padded, no decode mask at all
    same = prompts_of(tok, (9, 9, 9), seed=2)
    out = engine.generate(same, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))
    assert [c.token_ids for c in out] == [reference_greedy(model, p, 24, None) for p in same]


@pytest.mark.parametrize("family", ["granite", "granitemoehybrid"])
def test_greedy_n_samples_prefill_each_prompt_once(family, tok):
    model = tiny(family, tok)
    prompts = prompts_of(tok, (5, 11))
    engine = TransformersEngine(model)
    out = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, n=3, ignore_eos=True))
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1]
    for i, p in enumerate(prompts):
        ref = reference_greedy(model, p, 12, None)
        assert [c.token_ids for c in out[3 * i:3 * i + 3]] == [ref] * 3
    assert engine.stats.prefill_tokens == 5 + 11  # once per prompt, not once per sample
    if family == "granite":  # the preallocated cache: 6 rows, longest prompt + max_new_tokens slots, per layer
        c = model.config
        head_dim = c.hidden_size // c.num_attention_heads
        assert engine.stats.cache_bytes == c.num_hidden_layers * 2 * 6 * c.num_key_value_heads * (11 + 12) * head_dim * 4


@pytest.mark.parametrize("family", [*ATTENTION, *OTHER_LAYOUTS])
def test_sampled_logprobs_equal_a_teacher_forced_forward(family, tok):
    model = tiny(family, tok)
    prompts = prompts_of(tok)
    engine = TransformersEngine(model)
    params = SamplingParams(max_new_tokens=10, temperature=0.7, n=3, ignore_eos=True, seed=5)
    out = engine.generate(prompts, params)
    assert len(out) == len(prompts) * 3
    for c in out:
        ref = reference_logprobs(model, prompts[c.prompt_index], c.token_ids, 0.7)
        assert len(c.logprobs) == len(c.token_ids) == 10
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), atol=1e-5,
                                   rtol=0)
    # the n samples of a prompt differ (each row draws its own tokens after the copied prefill)
    assert len({tuple(c.token_ids) for c in out[:3]}) > 1


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.8)])
def test_truncated_logprobs_are_of_the_renormalised_distribution(top_k, top_p, tok):
    model = tiny("llama", tok)
    with torch.no_grad():  # a sharper distribution, so top_p keeps a small set
        model.lm_head.weight.mul_(30.0)
    prompts = prompts_of(tok, (4, 9))
    out = TransformersEngine(model).generate(prompts, SamplingParams(
        max_new_tokens=8, temperature=0.7, top_k=top_k, top_p=top_p, n=2, ignore_eos=True, seed=2))
    for c in out:
        ref = reference_logprobs(model, prompts[c.prompt_index], c.token_ids, 0.7, top_k, top_p)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), atol=1e-5,
                                   rtol=0)


def test_rows_finish_independently_and_the_others_are_unchanged(tok):
    model = tiny("llama", tok)
    prompts = prompts_of(tok, (6, 10, 3))
    engine = TransformersEngine(model)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    free_ids = [c.token_ids for c in free]
    # a stop token prompt 1 reaches at step 4 and prompt 2 never does
    stop = next(t for t in free_ids[1][4:] if t not in free_ids[2] and t not in free_ids[1][:4])
    steps_before = engine.stats.steps
    rows_before = engine.stats.rows_forwarded
    out = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[stop],
                                                  eos_token_id=tok.eos_token_id, ignore_eos=True))
    for c, ids in zip(out, free_ids):
        if stop in ids:
            assert c.finish_reason == "stop" and c.token_ids == ids[:ids.index(stop) + 1]
            assert c.token_ids[-1] == stop
        else:
            assert c.finish_reason == "length" and c.token_ids == ids
    assert out[2].finish_reason == "length" and out[1].finish_reason == "stop"
    steps = engine.stats.steps - steps_before
    assert steps == 19
    # a stopped row leaves the batch: fewer rows went through the decode steps than 3 per step
    assert engine.stats.rows_forwarded - rows_before == sum(len(c.token_ids) for c in out) - len(out)


def test_seed_reproduces_samples_and_another_seed_differs(tok):
    model = tiny("granite", tok)
    prompts = prompts_of(tok, (5, 8))
    engine = TransformersEngine(model)

    def run(seed):
        return [c.token_ids for c in engine.generate(prompts, SamplingParams(
            max_new_tokens=12, temperature=1.0, n=2, ignore_eos=True, seed=seed))]

    first = run(11)
    assert run(11) == first
    assert run(12) != first


def test_first_token_frequencies_follow_the_tempered_softmax(tok):
    """The empirical distribution of the first sampled token over many samples matches softmax(logits / T): a
    chi-square statistic far below a loose bound, while the untempered softmax is far above it (so the test could
    fail)."""
    model = tiny("llama", tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logits with a spread, so temperature matters
    prompt = prompts_of(tok, (6,))[0]
    n, temperature = 4000, 0.7
    out = TransformersEngine(model, max_num_seqs=n).generate(
        [prompt], SamplingParams(max_new_tokens=1, temperature=temperature, n=n, ignore_eos=True, seed=3))
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out]), minlength=len(tok)).double()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()

    def chi_square(probs):
        expected = probs * n
        big = expected >= 5  # pool the rare tokens into one cell
        cells_obs = torch.cat([counts[big], counts[~big].sum()[None]])
        cells_exp = torch.cat([expected[big], expected[~big].sum()[None]])
        return (((cells_obs - cells_exp) ** 2) / cells_exp.clamp(min=1e-12)).sum().item(), int(big.sum())

    stat, df = chi_square(torch.softmax(logits / temperature, -1))
    assert df >= 10, "too few well-populated tokens for the test to mean anything"
    bound = df + 6 * (2 * df) ** 0.5  # about six standard deviations above the mean
    assert stat < bound, (stat, bound)
    wrong, _ = chi_square(torch.softmax(logits, -1))
    assert wrong > 3 * bound


def test_streaming_sees_every_token_once_and_abort_stops_a_row(tok):
    model = tiny("llama", tok)
    prompts = prompts_of(tok, (5, 9))
    engine = TransformersEngine(model)
    params = SamplingParams(max_new_tokens=10, temperature=0.8, n=2, ignore_eos=True, seed=4)
    seen: dict[int, list[int]] = {}
    finishes: dict[int, str] = {}

    def watch(step):
        for row, token, finish in zip(step.rows, step.token_ids, step.finish_reasons):
            assert row not in finishes, "a finished row was streamed again"
            seen.setdefault(row, []).append(token)
            if finish is not None:
                finishes[row] = finish

    out = engine.generate(prompts, params, on_step=watch)
    assert seen == {i: c.token_ids for i, c in enumerate(out)}
    assert finishes == dict.fromkeys(range(4), "length")
    assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in out]  # same seed

    # abort, greedy: the other rows' tokens do not depend on the random stream, so they must run on unchanged
    greedy = SamplingParams(max_new_tokens=10, temperature=0, n=2, ignore_eos=True)
    full = engine.generate(prompts, greedy)
    steps = []

    def abort_row_2_at_step_3(step):
        steps.append(list(step.rows))
        return [2] if len(steps) == 4 else None

    aborted = engine.generate(prompts, greedy, on_step=abort_row_2_at_step_3)
    assert aborted[2].finish_reason == "abort" and aborted[2].token_ids == full[2].token_ids[:4]
    assert all(2 not in rows for rows in steps[4:]) and len(steps) == 10
    for i in (0, 1, 3):
        assert aborted[i].finish_reason == "length" and aborted[i].token_ids == full[i].token_ids


def test_waves_of_max_num_seqs_keep_prompt_major_results_and_stream_their_own_indices(tok):
    model = tiny("granite", tok)
    prompts = prompts_of(tok, (4, 9, 2, 6, 11))
    engine = TransformersEngine(model, max_num_seqs=4)  # n = 2: two prompts a wave, three waves
    assert isinstance(engine, Engine) and engine.name == "transformers"
    assert engine.capabilities.names() == ["weight_sync", "streaming", "shares_module", "prompt_logprobs"]
    params = SamplingParams(max_new_tokens=6, temperature=0, n=2, ignore_eos=True)
    seen: dict[int, list[int]] = {}

    def watch(step):
        for row, token in zip(step.rows, step.token_ids):
            seen.setdefault(row, []).append(token)
        return [7] if 7 in step.rows and len(seen[7]) == 3 else None  # abort a row of the second wave

    out = engine.generate(prompts, params, on_step=watch)
    assert [c.prompt_index for c in out] == [i for i in range(5) for _ in range(2)]
    assert seen == {i: c.token_ids for i, c in enumerate(out)}
    for i, c in enumerate(out):
        ref = reference_greedy(model, prompts[c.prompt_index], 6, None)
        if i == 7:
            assert c.finish_reason == "abort" and c.token_ids == ref[:3]
        else:
            assert c.finish_reason == "length" and c.token_ids == ref
    assert engine.stats.prefill_tokens == 4 + 9 + 2 + 6 + 11


def test_model_mode_is_restored_and_dropout_is_off_while_generating(tok):
    model = tiny("granite", tok, attention_dropout=0.5)
    prompts = prompts_of(tok, (4, 7))
    expected = [reference_greedy(model, p, 8, None) for p in prompts]
    model.train()
    out = TransformersEngine(model).generate(prompts, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    assert [c.token_ids for c in out] == expected
    assert model.training


def test_bad_input_is_a_clear_error_naming_the_prompt(tok):
    engine = TransformersEngine(tiny("llama", tok))
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[5, 6], []], params)
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside the vocabulary \(size 300\): \[300\]"):
        engine.generate([[5, 300], [7]], params)
    with pytest.raises(ValueError, match=r"prompt 2 .*\[-1\]"):
        engine.generate([[5], [7], [-1, 4]], params)
    assert engine.generate([], params) == []


def test_a_cache_layout_not_checked_here_is_refused_naming_the_engines_to_use(tok):
    """DeepSeek-V3.2's indexed attention keeps more than keys and values in its cache layers."""
    cfg = DeepseekV32Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=2,
                            num_experts_per_tok=1, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
                            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(EngineError, match="StaticIndexedLayer.*'native' engine"):
        TransformersEngine(model)
