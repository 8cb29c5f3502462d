"""Multi-turn rollouts: the model talks, the environment runs its tool calls, the answers go back into the context.

``multi_turn_rollout`` drives any engine with the rollout interface (``generate(prompts, SamplingParams) ->
list[Completion]``, prompt-major: the native engine, colocated vLLM or a remote server) and a
:class:`~posttrain.grpo.tools.ToolEnvironment`. Every trajectory still running is one prompt of the same engine
call, so the turns of many trajectories are batched together; the first turn samples ``n`` completions per prompt
from one prefill. A trajectory ends when the model answers without a call (``stop``), when it has had
``max_turns`` assistant turns (``turns``), or when its tokens after the prompt would pass ``max_tokens``
(``length``; the turn that overflows is cut there and nothing more is appended).

Token bookkeeping: the tokens after the prompt alternate between what the model sampled (``loss_mask`` 1, with the
sampler's log-probabilities) and what the chat template puts around the tool answers (``loss_mask`` 0): the end of
the assistant turn, each ``tool`` message, and the next assistant header. Those are computed by rendering the chat
template with and without the tool messages and tokenizing the difference, so the context the model sees is the one
the template would produce for the whole conversation. The model's own tokens are never decoded and re-encoded.
This module never changes weights and never computes a loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from posttrain.grpo.tools import ToolEnvironment
from posttrain.rollout import SamplingParams


@dataclass
class Trajectory:
    """One multi-turn rollout of prompt ``prompt_index`` (its ``sample``-th of ``n``)."""

    prompt_index: int
    sample: int
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)  # model and tool tokens after the prompt
    loss_mask: list[int] = field(default_factory=list)  # 1: sampled by the model (trained), 0: tool/template tokens
    logprobs: list[float] = field(default_factory=list)  # sampler log-probs of the masked-in tokens, in order
    messages: list[dict[str, Any]] = field(default_factory=list)  # assistant and tool messages after the prompt
    finish_reason: str = ""  # stop | turns | length
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0


class ToolTurnTemplate:
    """Token ids the chat template puts between an assistant turn that ended with EOS and the next assistant turn."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token
        self._head = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}]
        self._base = tokenizer.apply_chat_template(self._head, tokenize=False)
        cut = self._base.rfind(self.eos)
        if cut < 0:
            raise ValueError("multi-turn rollouts need a chat template that ends assistant turns with the EOS token "
                             f"{self.eos!r}")
        self._cut = cut + len(self.eos)

    def ids(self, tool_messages: list[dict[str, Any]]) -> list[int]:
        full = self.tokenizer.apply_chat_template(self._head + tool_messages, tokenize=False,
                                                  add_generation_prompt=True)
        if not full.startswith(self._base[: self._cut]):
            raise ValueError("the chat template renders an assistant turn differently when tool messages follow it")
        return list(self.tokenizer.encode(full[self._cut:], add_special_tokens=False))


def multi_turn_rollout(engine, tokenizer, env: ToolEnvironment, prompt_ids: list[list[int]],
                       prompt_messages: list[list[dict[str, Any]]], params: SamplingParams, max_turns: int,
                       max_tokens: int, template: ToolTurnTemplate | None = None) -> list[Trajectory]:
    """``params.n`` trajectories per prompt, prompt-major (prompt i's j-th at i * n + j); see the module docstring.

    ``params.max_new_tokens`` limits each assistant turn, ``max_tokens`` the whole trajectory after the prompt."""
    if max_turns < 1 or max_tokens < 1:
        raise ValueError(f"max_turns and max_tokens must be >= 1, got {max_turns}, {max_tokens}")
    if len(prompt_ids) != len(prompt_messages):
        raise ValueError("multi_turn_rollout: one message list per prompt")
    template = template or ToolTurnTemplate(tokenizer)
    stop_ids = set(params.stop_ids())
    n = params.n
    trajs = [Trajectory(i, j, list(p)) for i, p in enumerate(prompt_ids) for j in range(n)]
    active = list(range(len(trajs)))
    for turn in range(max_turns):
        if not active:
            break
        seed = None if params.seed is None else params.seed + 7_919 * turn
        if turn == 0:  # each prompt prefilled once, its state copied n ways
            outs = engine.generate([list(p) for p in prompt_ids], dataclasses.replace(params, seed=seed))
        else:
            outs = engine.generate([trajs[k].prompt_ids + trajs[k].completion_ids for k in active],
                                   dataclasses.replace(params, n=1, seed=seed))
        if len(outs) != len(active):
            raise RuntimeError(f"the rollout engine returned {len(outs)} completions for {len(active)} trajectories")
        still = []
        for k, out in zip(active, outs, strict=True):
            t = trajs[k]
            t.turns += 1
            tokens, logprobs, reason = list(out.token_ids), list(out.logprobs), out.finish_reason
            room = max_tokens - len(t.completion_ids)
            if len(tokens) > room:
                tokens, logprobs, reason = tokens[:room], logprobs[:room], "length"
            t.completion_ids += tokens
            t.loss_mask += [1] * len(tokens)
            t.logprobs += logprobs
            text_ids = tokens[:-1] if tokens and reason == "stop" and tokens[-1] in stop_ids else tokens
            t.messages.append({"role": "assistant",
                               "content": tokenizer.decode(text_ids, skip_special_tokens=False)})
            if reason != "stop":
                t.finish_reason = "length"
                continue
            answers = env.step(prompt_messages[t.prompt_index] + t.messages)
            if not answers:
                t.finish_reason = "stop"
                continue
            between = template.ids(answers)
            if len(t.completion_ids) + len(between) > max_tokens:
                t.finish_reason = "length"
                continue
            t.messages += answers
            t.tool_calls += len(answers)
            t.tool_errors += sum(str(a["content"]).startswith("error:") for a in answers)
            t.completion_ids += between
            t.loss_mask += [0] * len(between)
            if turn + 1 == max_turns:
                t.finish_reason = "turns"
                continue
            still.append(k)
        active = still
    return trajs
