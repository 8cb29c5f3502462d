"""The request features of ``SamplingParams`` (penalties, min_tokens, logit_bias, reported log-probabilities, prompt
log-probabilities, grammar constraints) on both in-process engines, against independent computations.

Tiny random models: the in-tree hybrid (native engine) and a transformers ``LlamaForCausalLM`` (transformers
engine), vocabulary matched to the in-tree byte-level BPE tokenizer. Expected values never come from the engine
under test: greedy tokens from a naive loop that runs a fresh forward over prompt + tokens so far and applies each
feature to the last logits in plain Python; log-probabilities from that same fresh forward; constrained outputs are
checked by ``json.loads`` and ``jsonschema``. Each feature test also checks that the feature changes the output in
its setting, so it would fail without the feature.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import jsonschema
import pytest
import torch
import xgrammar as xgr
from transformers import AutoModelForCausalLM, LlamaConfig

from posttrain.models.hybrid import HybridConfig, HybridForCausalLM
from posttrain.rollout.base import MAX_LOGPROBS, SamplingParams
from posttrain.rollout.constrained import json_object_constraint, json_schema_constraint
from posttrain.rollout.native import NativeEngine
from posttrain.rollout.transformers_engine import TransformersEngine
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NEW = 10


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(arithmetic_corpus(300), vocab_size=300)


def tiny_native(tok):
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3,
                          layer_types=["mamba", "attention", "mamba"], num_attention_heads=4, num_key_value_heads=2,
                          mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8, intermediate_size=32,
                          shared_intermediate_size=64, initializer_range=0.2, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)
    return NativeEngine(HybridForCausalLM(config).float().eval())


def tiny_llama(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config._attn_implementation = "sdpa"
    return TransformersEngine(AutoModelForCausalLM.from_config(config).float().eval())


@pytest.fixture(scope="module", params=["native", "transformers"])
def engine(request, tok):
    return tiny_native(tok) if request.param == "native" else tiny_llama(tok)


def prompts_of(tok) -> list[list[int]]:
    return [tok.encode("Question: Ada has 12 apples"), tok.encode("Answer: 7")]  # different lengths


@torch.no_grad()
def last_logits(engine, ids: list[int]) -> torch.Tensor:
    """The model's next-token logits after ``ids``, from a fresh forward over the whole sequence."""
    return engine.model(input_ids=torch.tensor([ids])).logits[0, -1].double()


def naive_greedy(engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], str]:
    """Greedy decoding with the features applied one token at a time, in plain Python, in vLLM's order."""
    out: list[int] = []
    stops = set(params.stop_ids())
    for step in range(params.max_new_tokens):
        logits = last_logits(engine, prompt + out).tolist()
        for token, bias in (params.logit_bias or {}).items():
            logits[token] += bias
        if step < params.min_tokens:
            for token in stops:
                logits[token] = -math.inf
        seen = set(prompt) | set(out)
        for token in seen:
            x = logits[token]
            logits[token] = x / params.repetition_penalty if x > 0 else x * params.repetition_penalty
        for token, count in Counter(out).items():
            logits[token] -= params.frequency_penalty * count + params.presence_penalty
        out.append(max(range(len(logits)), key=logits.__getitem__))
        if out[-1] in stops:
            return out, "stop"
    return out, "length"


FEATURES = {
    "presence": {"presence_penalty": 2.0},
    "frequency": {"frequency_penalty": 1.5},
    "repetition": {"repetition_penalty": 4.0},
    "repetition-below-1": {"repetition_penalty": 0.25},
    "logit_bias": {"logit_bias": {40: 4.0, 41: 3.5, 42: -100.0}},
    "all": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.5, "logit_bias": {40: 2.0}},
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_greedy_with_a_feature_equals_the_naive_loop(engine, tok, feature):
    prompts = prompts_of(tok)
    params = SamplingParams(max_new_tokens=NEW, temperature=0, **FEATURES[feature])
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=NEW, temperature=0))
    ours = engine.generate(prompts, params)
    for prompt, c, p in zip(prompts, ours, plain):
        assert (c.token_ids, c.finish_reason) == naive_greedy(engine, prompt, params)
    assert [c.token_ids for c in ours] != [c.token_ids for c in plain]  # the feature matters here


def test_min_tokens_masks_eos_until_reached(engine, tok):
    eos = tok.eos_token_id
    # EOS made the greedy choice: without min_tokens every row stops at once
    base = {"max_new_tokens": NEW, "temperature": 0, "eos_token_id": eos, "logit_bias": {eos: 30.0}, "n": 2}
    assert all(c.token_ids == [eos] for c in engine.generate(prompts_of(tok), SamplingParams(**base)))
    params = SamplingParams(**base, min_tokens=4, stop_token_ids=[7])
    ours = engine.generate(prompts_of(tok), params)
    for i, c in enumerate(ours):
        assert (c.token_ids, c.finish_reason) == naive_greedy(engine, prompts_of(tok)[i // 2], params)
        assert len(c.token_ids) == 5 and c.token_ids[-1] == eos and c.finish_reason == "stop"
        assert 7 not in c.token_ids[:4]


def test_penalty_state_follows_rows_when_some_leave(engine, tok):
    """Row 0 stops early on a stop token; row 1 goes on, and its penalties must still be its own."""
    prompts = prompts_of(tok)
    params = SamplingParams(max_new_tokens=12, temperature=0, presence_penalty=1.0, repetition_penalty=2.0)
    refs = [naive_greedy(engine, p, params)[0] for p in prompts]
    stop = next(t for t in refs[0][2:6] if t not in refs[1] and t not in refs[0][:refs[0].index(t)])
    params = SamplingParams(max_new_tokens=12, temperature=0, presence_penalty=1.0, repetition_penalty=2.0,
                            stop_token_ids=[stop])
    ours = engine.generate(prompts, params)
    assert ours[0].token_ids == refs[0][:refs[0].index(stop) + 1] and ours[0].finish_reason == "stop"
    assert ours[1].token_ids == refs[1] and ours[1].finish_reason == "length"


def test_the_feature_path_with_nothing_to_apply_samples_as_the_plain_one(engine, tok):
    """logprobs=0 routes the step through the features' path; tokens and Completion.logprobs are the plain sampler's."""
    kw = {"max_new_tokens": NEW, "temperature": 0.8, "top_k": 30, "top_p": 0.9, "n": 3, "seed": 5}
    plain = engine.generate(prompts_of(tok), SamplingParams(**kw))
    reported = engine.generate(prompts_of(tok), SamplingParams(**kw, logprobs=0, logprobs_mode="processed"))
    assert plain[0].reported_logprobs is None and plain[0].top_logprobs is None
    for a, b in zip(plain, reported):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs == b.reported_logprobs  # processed: the distribution sampled from
        assert b.top_logprobs == [[] for _ in b.token_ids]  # k = 0: the sampled token only


def test_raw_logprobs_are_the_models_log_softmax(engine, tok):
    k = 5
    params = SamplingParams(max_new_tokens=NEW, temperature=0.7, top_k=20, n=2, seed=3, logprobs=k,
                            presence_penalty=1.0)  # raw: before the penalty and the temperature
    prompts = prompts_of(tok)
    for c in engine.generate(prompts, params):
        prompt = prompts[c.prompt_index]
        assert len(c.reported_logprobs) == len(c.top_logprobs) == len(c.token_ids)
        for t, token in enumerate(c.token_ids):
            ref = torch.log_softmax(last_logits(engine, prompt + c.token_ids[:t]), dim=-1)
            assert c.reported_logprobs[t] == pytest.approx(ref[token].item(), abs=1e-4)
            top = c.top_logprobs[t]
            assert [v for _, v in top] == pytest.approx(ref.topk(k).values.tolist(), abs=1e-4)
            assert all(abs(ref[i].item() - v) < 1e-4 for i, v in top)
            assert c.reported_logprobs[t] != pytest.approx(c.logprobs[t], abs=1e-3)  # not the sampled distribution


def test_processed_logprobs_are_the_distribution_sampled_from(engine, tok):
    k, temperature, top_k = 4, 0.7, 20
    bias = {40: 2.0}
    params = SamplingParams(max_new_tokens=NEW, temperature=temperature, top_k=top_k, n=2, seed=3, logprobs=k,
                            logprobs_mode="processed", presence_penalty=1.0, logit_bias=bias)
    prompts = prompts_of(tok)
    for c in engine.generate(prompts, params):
        prompt = prompts[c.prompt_index]
        for t, token in enumerate(c.token_ids):
            logits = last_logits(engine, prompt + c.token_ids[:t])
            logits[40] += 2.0
            for seen in set(c.token_ids[:t]):
                logits[seen] -= 1.0
            logits = logits / temperature
            kth = logits.topk(top_k).values[-1]
            ref = torch.log_softmax(logits.masked_fill(logits < kth, -math.inf), dim=-1)
            assert c.reported_logprobs[t] == pytest.approx(ref[token].item(), abs=1e-4)
            assert c.logprobs[t] == pytest.approx(ref[token].item(), abs=1e-4)
            assert [v for _, v in c.top_logprobs[t]] == pytest.approx(ref.topk(k).values.tolist(), abs=1e-4)
            assert all(abs(ref[i].item() - v) < 1e-4 for i, v in c.top_logprobs[t])


def test_prompt_logprobs_equal_a_fresh_forward(engine, tok):
    assert engine.capabilities.prompt_logprobs
    prompts = prompts_of(tok) + [tok.encode("7"), tok.encode("Question: Ben has 40 coins and gives away 13.")]
    top_n = 3
    result = engine.prompt_logprobs(prompts, top_n)
    assert len(result) == len(prompts)
    for prompt, entries in zip(prompts, result):
        assert len(entries) == len(prompt) and entries[0] is None
        with torch.no_grad():
            ref = torch.log_softmax(engine.model(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
        for t in range(1, len(prompt)):
            lp, top = entries[t]
            assert lp == pytest.approx(ref[t - 1, prompt[t]].item(), abs=1e-4)
            assert [v for _, v in top] == pytest.approx(ref[t - 1].topk(top_n).values.tolist(), abs=1e-4)
            assert all(abs(ref[t - 1, i].item() - v) < 1e-4 for i, v in top)
    assert [e[1] for e in engine.prompt_logprobs(prompts[:1], 0)[0][1:]] == [[]] * (len(prompts[0]) - 1)


def test_prompt_logprobs_batches_fit_the_logits_budget(engine, tok, monkeypatch):
    """With a budget for about one prompt's logits, prompts go in small batches and give the same log-probs."""
    from posttrain.rollout import base

    prompts = prompts_of(tok) + [tok.encode("7"), tok.encode("Question: Ben has 40 coins and gives away 13.")]
    whole = engine.prompt_logprobs(prompts, 2)
    budget = max(map(len, prompts)) * engine._vocab_size() * 4 + 1
    monkeypatch.setattr(base, "PROMPT_LOGITS_BYTES", budget)
    batches = list(engine._logit_batches(prompts))
    assert [p for batch in batches for p in batch] == prompts and len(batches) > 1
    assert all(len(b) * max(map(len, b)) * engine._vocab_size() * 4 <= budget for b in batches)
    small = engine.prompt_logprobs(prompts, 2)
    for a, b in zip(whole, small):
        assert [x if x is None else (pytest.approx(x[0], abs=1e-5), [i for i, _ in x[1]]) for x in a] == \
               [x if x is None else (x[0], [i for i, _ in x[1]]) for x in b]


# -- grammar-constrained decoding ----------------------------------------------------------------------------

# a pattern, not a bare maxLength, for the city: a random model's free string may hold an encoded UTF-16 surrogate
# (bytes ED A0-BF xx), which xgrammar takes for a character although it is no valid UTF-8 (constrained.py)
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[a-z ]{1,6}$"},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "days"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
         "additionalProperties": False}


def required_tool_schema(tools: dict[str, dict]) -> dict:
    """``tool_choice: "required"`` as vLLM writes it: an array of at least one {name, parameters} call."""
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
         "required": ["name", "parameters"]} for name, params in tools.items()]}}


def constrained_rows(engine, tok, constraint, n: int = 6, seed: int = 0, max_new_tokens: int = 64, **kw):
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n, seed=seed,
                            eos_token_id=tok.eos_token_id, constraint=constraint, **kw)
    return engine.generate(prompts_of(tok)[:1], params)


def json_text(tok, c) -> str:
    assert c.finish_reason == "stop" and c.token_ids[-1] == tok.eos_token_id
    return tok.decode(c.token_ids[:-1], skip_special_tokens=False)


@pytest.mark.parametrize("shape", ["named-function", "required-tools"])
def test_json_schema_outputs_validate(engine, tok, shape):
    schema = WEATHER if shape == "named-function" else required_tool_schema({"get_weather": WEATHER,
                                                                             "get_time": CLOCK})
    vocab = engine.model.config.vocab_size
    constraint = json_schema_constraint(tok, schema, vocab)
    rows = constrained_rows(engine, tok, constraint, max_new_tokens=160)
    stopped = [c for c in rows if c.finish_reason == "stop"]
    for c in stopped:
        value = json.loads(json_text(tok, c))  # the completion is exactly the JSON text, then EOS
        jsonschema.validate(value, schema)
    # a random model may go on adding tool calls to the array past the budget: such a row is a valid prefix
    assert len(stopped) >= 4 if shape == "required-tools" else len(stopped) == len(rows)
    for c in rows:
        if c.finish_reason != "stop":
            matcher = xgr.GrammarMatcher(constraint.compiled)
            assert all(matcher.accept_token(t) for t in c.token_ids) and not matcher.is_terminated()
    # an untrained model: without the grammar the same sampling is no JSON at all
    free = engine.generate(prompts_of(tok)[:1], SamplingParams(max_new_tokens=64, temperature=1.0, n=6, seed=0,
                                                               eos_token_id=tok.eos_token_id))
    with pytest.raises(json.JSONDecodeError):
        json.loads(tok.decode(free[0].token_ids, skip_special_tokens=True))


def test_json_object_outputs_parse(engine, tok):
    quote = tok.convert_tokens_to_ids('"')
    vocab = engine.model.config.vocab_size
    # a bias towards the closing quote keeps a random model's strings short; the structure is the grammar's
    rows = constrained_rows(engine, tok, json_object_constraint(tok, vocab), n=8, logit_bias={quote: 3.0})
    parsed = [json.loads(json_text(tok, c)) for c in rows if c.finish_reason == "stop"]
    assert len(parsed) >= 6 and all(isinstance(v, dict) for v in parsed)
    assert any(v for v in parsed)  # not only {}


def test_a_constraint_with_features_and_reports(engine, tok):
    """The grammar mask comes after the penalties; a processed report is the masked distribution."""
    vocab = engine.model.config.vocab_size
    rows = constrained_rows(engine, tok, json_schema_constraint(tok, CLOCK, vocab), n=3, logprobs=2,
                            logprobs_mode="processed", presence_penalty=2.0, repetition_penalty=1.5)
    for c in rows:
        jsonschema.validate(json.loads(json_text(tok, c)), CLOCK)
        assert c.reported_logprobs == c.logprobs
        # where the grammar allows one token only, it has all the mass
        assert max(c.logprobs) == pytest.approx(0.0, abs=1e-6)


def test_a_complete_grammar_ends_the_row_before_min_tokens(engine, tok):
    """min_tokens masks the stop tokens, but a complete grammar allows nothing else: the grammar wins."""
    vocab = engine.model.config.vocab_size
    rows = constrained_rows(engine, tok, json_schema_constraint(tok, CLOCK, vocab), n=3, min_tokens=40)
    for c in rows:
        jsonschema.validate(json.loads(json_text(tok, c)), CLOCK)
        assert len(c.token_ids) < 40


# -- bad values ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, name", [
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"presence_penalty": float("inf")}, "presence_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 11, "max_new_tokens": 10}, "min_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"logit_bias": {3: 101.0}}, "logit_bias"),
    ({"logit_bias": {3: float("nan")}}, "logit_bias"),
    ({"logit_bias": {"3": 1.0}}, "logit_bias"),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs_mode": "processed_logits"}, "logprobs_mode"),
    ({"constraint": {"type": "object"}}, "constraint"),
])
def test_bad_values_name_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**fields)


def test_bad_values_that_need_the_vocabulary(engine, tok):
    vocab = engine.model.config.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        engine.generate(prompts_of(tok), SamplingParams(max_new_tokens=2, logit_bias={vocab: 1.0}))
    with pytest.raises(ValueError, match="constraint"):
        engine.generate(prompts_of(tok), SamplingParams(
            max_new_tokens=2, constraint=json_object_constraint(tok, vocab + 8)))
    with pytest.raises(ValueError, match="top_n"):
        engine.prompt_logprobs(prompts_of(tok), MAX_LOGPROBS + 1)
