"""A tiny hybrid fine-tuned with ``posttrain sft`` on generated GSM8K-format arithmetic learns: greedy accuracy on
held-out problems rises well above the base model's (0%).

The tiny model here uses rotary positions (``position_embedding_type="rope"``): with its single attention layer it
learns to copy the operands from the question far sooner than with no positions, which keeps this test short.
"""

from __future__ import annotations

import json
import random
import re

import torch

from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.rollout.native import NativeEngine, SamplingParams
from posttrain.synthetic import arithmetic_corpus, arithmetic_problem
from posttrain.tokenizer import build_tokenizer

ANSWER = re.compile(r"####\s*(-?\d+)")


def accuracy(model, tok, problems) -> float:
    prompts = [tok.apply_chat_template([{"role": "user", "content": p["question"]}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for p in problems]
    outs = NativeEngine(model.eval()).generate(prompts, SamplingParams(max_new_tokens=28, temperature=0.0,
                                                                       eos_token_id=tok.eos_token_id))
    right = 0
    for p, out in zip(problems, outs):
        got = ANSWER.search(tok.decode(out.token_ids, skip_special_tokens=True))
        right += bool(got) and got.group(1) == ANSWER.search(p["answer"]).group(1)
    return right / len(problems)


def test_sft_on_arithmetic_learns(tmp_path):
    from posttrain.config import load_config
    from posttrain.train.config import TrainConfig
    from posttrain.train.run import run_training

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = build_tokenizer(arithmetic_corpus(300), vocab_size=300)
        rng = random.Random(0)
        with open(tmp_path / "train.jsonl", "w") as f:
            for _ in range(1500):
                p = arithmetic_problem(rng, max_operand=5)
                f.write(json.dumps({"messages": [{"role": "user", "content": p["question"]},
                                                 {"role": "assistant", "content": p["answer"]}]}) + "\n")
        held_out = [arithmetic_problem(random.Random(10_000 + i), max_operand=5) for i in range(60)]
        torch.manual_seed(0)
        base = HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, bos_token_id=None,
                                        position_embedding_type="rope"))
        base.save_pretrained(tmp_path / "base")
        tok.save_pretrained(str(tmp_path / "base"))
        recipe = tmp_path / "sft.yaml"
        recipe.write_text(
            f"model: {{path: {tmp_path / 'base'}}}\n"
            f"data: {{train_files: [{tmp_path / 'train.jsonl'}], max_length: 256, packing: true}}\n"
            "optim: {lr: 4.0e-3, per_device_batch_size: 2, max_steps: 150, warmup_steps: 10, min_lr_ratio: 0.1}\n"
            f"checkpoint: {{output_dir: {tmp_path / 'run'}, every_steps: 0}}\n"
            "logging: {progress: false}\n")
        base_acc = accuracy(base, tok, held_out)
        run_training(load_config(TrainConfig, recipe), "sft")
        tuned_acc = accuracy(HybridForCausalLM.from_pretrained(tmp_path / "run" / "final"), tok, held_out)
    finally:
        torch.set_num_threads(threads)
    print(f"held-out accuracy: base {base_acc:.2f}, after SFT {tuned_acc:.2f}")
    assert tuned_acc >= base_acc + 0.15, (base_acc, tuned_acc)
