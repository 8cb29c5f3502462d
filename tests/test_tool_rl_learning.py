"""A tiny model learns, under multi-turn GRPO on the CPU, to call a calculator for products it cannot compute.

Set-up: two-digit products a*b (a, b in 10..39), pairs split into training and held-out sets that share no pair.
The tokenizer is word-level over Granite's chat template (every number is one token, the template's fixed phrases
too), so the model's job is to copy the operands into a ``calc`` call and the tool's answer back, never to multiply
(it cannot: held-out products are of pairs it has never seen). A brief SFT warm-up on tool-call trajectories (then
a few steps mixing in direct guesses, so the policy does not always call) leaves a policy that calls on some prompts
and copies imperfectly. GRPO with ``final_answer_reward`` (the last assistant message, with no call, against the
product; the reward sees the whole trajectory) then raises held-out sampled accuracy (4 samples per prompt, at the rollout temperature) by a margin asserted here,
through the multi-turn rollouts of ``GrpoTrainer`` on the native engine with tool tokens masked out of the loss.
"""

from __future__ import annotations

import random
import re

import pytest
import torch
from posttrain.rewards import RewardSet, WeightedReward

from posttrain.grpo.config import (
    CheckpointConfig,
    DynamicSamplingConfig,
    EvalConfig,
    GrpoConfig,
    LoggingConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    ToolsConfig,
)
from posttrain.grpo.loss import LossConfig
from posttrain.grpo.tools import Tool, ToolEnvironment, calculate, final_answer_reward
from posttrain.grpo.trainer import GrpoTrainer

PIECE = r"\d+|[^\d]+"  # numbers, and the text between them (the template's fixed phrases) as single tokens


def word_tokenizer(texts: list[str], max_number: int = 1600):
    """Word-level tokenizer with Granite's chat template: each number below ``max_number`` is one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from posttrain.tokenizer import (
        CHAT_TEMPLATE,
        END_OF_ROLE,
        END_OF_TEXT,
        PAD,
        SPECIAL_TOKENS,
        START_OF_ROLE,
        TOOL_CALL_CLOSE,
        TOOL_CALL_OPEN,
    )

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for n in range(max_number + 1):
        vocab.setdefault(str(n), len(vocab))
    for text in texts:
        for s in SPECIAL_TOKENS:
            text = text.replace(s, "\x00")
        for segment in text.split("\x00"):
            for piece in re.findall(PIECE, segment):
                vocab.setdefault(piece, len(vocab))
    vocab.setdefault("[UNK]", len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END_OF_TEXT, pad_token=PAD, bos_token=None,
                                      unk_token="[UNK]", model_max_length=1 << 20,
                                      additional_special_tokens=[START_OF_ROLE, END_OF_ROLE, TOOL_CALL_OPEN,
                                                                 TOOL_CALL_CLOSE])
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


CALC = Tool("calc", lambda e: calculate(e), {"type": "object", "properties": {"e": {"type": "string"}},
                                              "required": ["e"]})


def conversation(a: int, b: int, call: bool, rng: random.Random) -> list[dict]:
    messages = [{"role": "user", "content": f"{a}*{b}"}]
    if call:
        return messages + [
            {"role": "assistant",
             "content": '<tool_call>{"name": "calc", "arguments": {"e": "' + f"{a}*{b}" + '"}}</tool_call>'},
            {"role": "tool", "name": "calc", "content": str(a * b)},
            {"role": "assistant", "content": str(a * b)}]
    return messages + [{"role": "assistant", "content": str(a * b + rng.choice([-1, 1]) * rng.randint(1, 60))}]


def warm_up(train, env, stages, seed=0, batch=32, lr=1e-3):
    """SFT on trajectories (loss on the assistant tokens), in stages of (steps, fraction of trajectories that call):
    first calls only, until the model copies operands into the call and the tool's answer back, then a mix with
    direct guesses so that the policy calls only part of the time."""
    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import build_tokenizer

    rng = random.Random(seed)
    render = build_tokenizer(["x"], vocab_size=300)  # only to render the template as text
    tok = word_tokenizer([render.apply_chat_template(conversation(12, 34, k == 0, rng), tools=env.schemas,
                                                     tokenize=False) for k in range(2)])
    config = preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    bos_token_id=None, hidden_size=64, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16,
                    shared_intermediate_size=128, num_hidden_layers=4, mamba_chunk_size=64,
                    layer_types=["mamba", "attention", "mamba", "attention"], position_embedding_type="rope")
    torch.manual_seed(seed)
    model = HybridForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for call_frac in (f for steps, f in stages for _ in range(steps)):
        ids, labels, positions = [], [], []
        for _ in range(batch):
            a, b = rng.choice(train)
            enc = tok.apply_chat_template(conversation(a, b, rng.random() < call_frac, rng), tools=env.schemas,
                                          tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            x, mask = enc["input_ids"], enc["assistant_masks"]
            ids += x
            labels += [t if m else -100 for t, m in zip(x, mask, strict=True)]
            positions += list(range(len(x)))
        loss = model(torch.tensor([ids]), position_ids=torch.tensor([positions]), labels=torch.tensor([labels]),
                     return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tok


@pytest.fixture
def one_thread():
    """Float sums, and so the sampled trajectories, depend on torch's thread count: pin it to what was measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_grpo_teaches_a_tiny_model_to_call_the_calculator(tmp_path, one_thread):
    pairs = [(a, b) for a in range(10, 40) for b in range(10, 40)]
    random.Random(0).shuffle(pairs)
    held_out, train = pairs[:64], pairs[64:]
    assert not set(held_out) & set(train)
    env = ToolEnvironment([CALC])
    model, tok = warm_up(train, env, WARM_UP)
    rows = [{"prompt": [{"role": "user", "content": f"{a}*{b}"}], "answer": str(a * b)} for a, b in train]
    eval_rows = [{"prompt": [{"role": "user", "content": f"{a}*{b}"}], "answer": str(a * b)} for a, b in held_out]
    config = GrpoConfig(
        rollout=RolloutConfig(prompts_per_step=8, num_generations=8, max_new_tokens=12, temperature=ROLLOUT_TEMPERATURE),
        tools=ToolsConfig(max_turns=2, max_tokens=40),
        dynamic_sampling=DynamicSamplingConfig(enabled=True, max_rounds=2),
        loss=LossConfig("dapo"),
        optim=OptimConfig(lr=GRPO_LR, mini_batches=2, micro_batch_tokens=8192),
        eval=EvalConfig(every_steps=0, num_samples=4, temperature=ROLLOUT_TEMPERATURE),
        checkpoint=CheckpointConfig(output_dir=str(tmp_path)),
        run=RunConfig(steps=GRPO_STEPS, seed=0),
        logging=LoggingConfig(progress=False),
    )
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=rows, eval_rows=eval_rows, env=env,
                          reward_set=RewardSet([WeightedReward("answer", final_answer_reward, 1.0, in_process=True)]))
    before = trainer.evaluate()["eval/accuracy"]
    history = trainer.train()
    after = history[-1]["eval/accuracy"]
    calls = [h["tools/calls_mean"] for h in history]
    print(f"held-out sampled accuracy {before:.3f} -> {after:.3f}; tool calls per sampled trajectory "
          f"{calls[0]:.2f} -> {calls[-1]:.2f}; train accuracy {history[0]['accuracy']:.3f} -> "
          f"{history[-1]['accuracy']:.3f}")
    assert before < 0.75  # the warm-up policy guesses on some prompts (it cannot multiply) and miscopies
    assert after >= before + 0.08  # 256 held-out trajectories: about 2.5 standard errors
    assert calls[-1] > calls[0]
    assert all(0 < h["tools/masked_tokens_frac"] < 1 for h in history if h["tools/calls_mean"] > 0)


WARM_UP = [(450, 1.0), (30, 0.25)]
GRPO_STEPS = 20
GRPO_LR = 5e-4
ROLLOUT_TEMPERATURE = 0.6
