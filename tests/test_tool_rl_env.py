"""Tools, the tool environment and multi-turn rollouts: schemas enforced, calls parsed as the tool_call reward parses
them, turns of many trajectories batched into one engine call, the context equal to the chat template's rendering
of the whole conversation, tool tokens masked, and each way a trajectory ends."""

from __future__ import annotations

import json

import pytest
from posttrain.rewards.tool_call import parse_tool_calls

from posttrain.grpo.tools import Tool, ToolEnvironment, ToolError, calculate, calculator_tool, load_tool
from posttrain.rollout import Completion, SamplingParams
from posttrain.rollout.multiturn import multi_turn_rollout
from posttrain.rollout.native import NativeEngine


def call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


@pytest.fixture(scope="module")
def tok():
    from posttrain.tokenizer import build_tokenizer

    texts = [f"{a}*{b} = {a * b} " + call("calculator", expression=f"{a}*{b}") for a in range(30) for b in range(30)]
    return build_tokenizer(texts, vocab_size=400)


def test_calculator_is_exact_and_refuses_what_is_not_arithmetic():
    assert calculate("123456789*987654321") == str(123456789 * 987654321)
    assert calculate("(3+4)*2 - 10/4") == "11.5"
    assert calculate("6/3") == "2"
    for bad in ("__import__('os').system('true')", "x + 1", "2**1000", "1/0", "1 +"):
        with pytest.raises((ValueError, ZeroDivisionError)):
            calculate(bad)


def test_tool_schemas_are_checked_and_arguments_validated():
    with pytest.raises(ToolError, match="not a valid JSON schema"):
        Tool("bad", lambda: 0, {"type": "object", "properties": {"x": {"type": "no-such-type"}}})
    with pytest.raises(ToolError, match="type 'object'"):
        Tool("bad", lambda: 0, {"type": "string"})
    calc = calculator_tool()
    assert calc({"expression": "2*21"}) == "42"
    assert calc({"expr": "2*21"}).startswith("error: calculator:")  # unknown field, required one missing
    assert "expression" in calc({"expression": 42})  # wrong type: the message names the argument
    assert calc({"expression": "import os"}).startswith("error: calculator: ValueError")
    with pytest.raises(ToolError, match="two tools are named"):
        ToolEnvironment([calc, calculator_tool()])
    with pytest.raises(ToolError, match="unknown tool"):
        load_tool("abacus")
    assert load_tool("posttrain.grpo.tools:calculator_tool").name == "calculator"


def test_environment_answers_each_call_the_way_the_reward_parses_it():
    env = ToolEnvironment([calculator_tool()])
    text = "Let me compute. " + call("calculator", expression="12*34") + call("calculator", expression="5+5")
    assert [c["arguments"]["expression"] for c in parse_tool_calls(text)] == ["12*34", "5+5"]
    answers = env.step([{"role": "user", "content": "q"}, {"role": "assistant", "content": text}])
    assert answers == [{"role": "tool", "name": "calculator", "content": "408"},
                       {"role": "tool", "name": "calculator", "content": "10"}]
    assert env.step([{"role": "assistant", "content": "The answer is 408."}]) == []
    broken = env.step([{"role": "assistant", "content": "<tool_call>{not json</tool_call>"}])
    assert len(broken) == 1 and broken[0]["content"].startswith("error: not a valid tool call")
    unknown = env.step([{"role": "assistant", "content": call("abacus", x=1)}])
    assert "no tool named 'abacus'" in unknown[0]["content"]
    with pytest.raises(ValueError, match="must end with an assistant message"):
        env.step([{"role": "user", "content": "q"}])


class ScriptedEngine:
    """The rollout-engine interface (what the native engine, colocated vLLM and a remote server expose) answering
    from a script keyed by the user's question, so the multi-turn logic runs without a model or vLLM."""

    def __init__(self, tok, script: dict[str, list[str]], eos_stop: bool = True):
        self.tok, self.script, self.calls = tok, script, []
        self.eos_stop = eos_stop

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        self.calls.append((len(prompts), params.n))
        out = []
        for i, ids in enumerate(prompts):
            text = self.tok.decode(ids)
            question = text.split("<|start_of_role|>user<|end_of_role|>")[1].split("<|end_of_text|>")[0]
            turn = text.count("<|start_of_role|>assistant<|end_of_role|>") - 1
            for _ in range(params.n):
                reply = list(self.tok.encode(self.script[question][turn], add_special_tokens=False))
                reply = reply[: params.max_new_tokens]
                reason = "length"
                if len(reply) < params.max_new_tokens:
                    reply, reason = reply + [self.tok.eos_token_id], "stop"
                out.append(Completion(i, reply, [-0.5] * len(reply), reason))
        return out


def test_multi_turn_rollout_batches_turns_masks_tool_tokens_and_rebuilds_the_template_context(tok):
    env = ToolEnvironment([calculator_tool()])
    script = {
        "12*34": [call("calculator", expression="12*34"), "408"],  # one call, then an answer
        "7*8": ["56"],  # answers at once
        "9*9": [call("calculator", expression="9*9")] * 5,  # calls forever: the turn limit ends it
    }
    engine = ScriptedEngine(tok, script)
    prompts = [[{"role": "user", "content": q}] for q in script]
    ids = [tok.apply_chat_template(p, tools=env.schemas, add_generation_prompt=True, tokenize=True,
                                   return_dict=False) for p in prompts]
    params = SamplingParams(max_new_tokens=64, temperature=1.0, n=2, eos_token_id=tok.eos_token_id, seed=0)
    trajs = multi_turn_rollout(engine, tok, env, ids, prompts, params, max_turns=3, max_tokens=512)
    # one engine call per turn for all trajectories still running: 6, then 4 (7*8 answered), then 2
    assert engine.calls == [(3, 2), (4, 1), (2, 1)]
    assert [t.finish_reason for t in trajs] == ["stop", "stop", "stop", "stop", "turns", "turns"]
    first = trajs[0]
    assert [m["role"] for m in first.messages] == ["assistant", "tool", "assistant"]
    assert first.messages[1]["content"] == "408" and first.messages[2]["content"] == "408"
    for t, p in zip(trajs, [p for p in prompts for _ in range(2)], strict=True):
        # the tokens are exactly the chat template's rendering of the whole conversation
        whole = tok.apply_chat_template(p + t.messages, tools=env.schemas, tokenize=True, return_dict=False)
        got = t.prompt_ids + t.completion_ids
        if t.finish_reason == "turns":  # ends on a tool answer, followed by the next assistant header
            whole = tok.apply_chat_template(p + t.messages, tools=env.schemas, add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        else:  # the template closes the last assistant turn with a newline the model never samples
            got = got + list(tok.encode("\n", add_special_tokens=False))
        assert got == whole
        # the mask is 1 exactly on what the engine sampled, and the log-probs cover exactly those tokens
        sampled = [tok_id for m in t.messages if m["role"] == "assistant"
                   for tok_id in list(tok.encode(m["content"], add_special_tokens=False)) + [tok.eos_token_id]]
        assert [x for x, m in zip(t.completion_ids, t.loss_mask, strict=True) if m] == sampled
        assert len(t.logprobs) == sum(t.loss_mask)
        assert 0 < sum(t.loss_mask) <= len(t.loss_mask)
    assert trajs[2].loss_mask == [1] * len(trajs[2].completion_ids)  # no tool, nothing masked
    assert trajs[4].tool_calls == 3 and trajs[4].turns == 3


def test_token_limit_cuts_the_trajectory(tok):
    env = ToolEnvironment([calculator_tool()])
    script = {"12*34": [call("calculator", expression="12*34"), "408"]}
    prompts = [[{"role": "user", "content": "12*34"}]]
    ids = [tok.apply_chat_template(prompts[0], tools=env.schemas, add_generation_prompt=True, tokenize=True,
                                   return_dict=False)]
    first_turn = len(tok.encode(script["12*34"][0], add_special_tokens=False)) + 1
    params = SamplingParams(max_new_tokens=64, n=1, eos_token_id=tok.eos_token_id)
    # room for the call but not for the tool's answer: nothing is appended past the limit
    t = multi_turn_rollout(ScriptedEngine(tok, script), tok, env, ids, prompts, params, 4, first_turn + 2)[0]
    assert t.finish_reason == "length" and t.completion_ids == t.completion_ids[:first_turn]
    assert [m["role"] for m in t.messages] == ["assistant"]
    # a limit inside the first turn cuts the sampled tokens themselves
    t = multi_turn_rollout(ScriptedEngine(tok, script), tok, env, ids, prompts, params, 4, 5)[0]
    assert t.finish_reason == "length" and len(t.completion_ids) == 5 == len(t.logprobs)


def test_native_engine_drives_many_trajectories(tok):
    """The native engine behind the same interface: a random tiny model, sampled; every trajectory is consistent."""
    import torch

    from posttrain.models.hybrid import HybridForCausalLM, preset

    torch.manual_seed(0)
    model = HybridForCausalLM(preset("tiny", vocab_size=len(tok), hidden_size=32, mamba_n_heads=2, mamba_d_head=32,
                                     num_hidden_layers=2, layer_types=["mamba", "attention"],
                                     shared_intermediate_size=64, eos_token_id=tok.eos_token_id))
    env = ToolEnvironment([calculator_tool()])
    prompts = [[{"role": "user", "content": f"{a}*{a}"}] for a in range(4)]
    ids = [tok.apply_chat_template(p, tools=env.schemas, add_generation_prompt=True, tokenize=True,
                                   return_dict=False) for p in prompts]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, eos_token_id=tok.eos_token_id, seed=1)
    trajs = multi_turn_rollout(NativeEngine(model), tok, env, ids, prompts, params, 2, 40)
    assert len(trajs) == 12 and [t.prompt_index for t in trajs] == [i for i in range(4) for _ in range(3)]
    for t in trajs:
        assert t.finish_reason in ("stop", "length", "turns")
        assert len(t.completion_ids) <= 40 and len(t.logprobs) == sum(t.loss_mask)
        assert all(lp <= 0 for lp in t.logprobs)
