"""Packed SFT on a transformers Llama: ``posttrain``'s trainer against TRL's ``SFTTrainer`` with its own packing, on
this CPU.

Both train the same weights (transformers' ``LlamaForCausalLM``, a Llama-shaped tiny model saved by transformers:
hidden 256, MLP 688, 4 layers, 8 query / 4 key-value heads, random init, float32, ``attn_implementation="sdpa"``)
on the same generated GSM8K-format chat data with assistant-only loss.

- ours: ``posttrain.train.loop.Trainer`` with ``data.packing: true``: best-fit-decreasing bins of ``--max-length``
  tokens, a micro-batch of ``--bins`` bins flattened into one row, ``position_ids`` restarting at 0 and no
  attention mask (transformers' packed-sequence masks keep the conversations apart).
- anchor: TRL's ``SFTTrainer`` with ``SFTConfig(packing=True, packing_strategy="bfd", padding_free=True,
  max_length=--max-length, per_device_train_batch_size=--bins, assistant_only_loss=True, learning_rate=1e-3,
  lr_scheduler_type="constant", bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0)``, the model loaded
  with ``attn_implementation="sdpa"``: TRL's own padding-free packing, which it allows on CPU with sdpa.

The measure is useful (non-pad) tokens per second over the steps after the first (the first pays one-off set-up
costs on both sides). Runs are interleaved (ours, TRL, ours, TRL, ...) so a shared machine's load hits both alike;
the best round of each is reported, with the machine's load average before and after. Ends with one JSON line:
name, ours, anchor, unit, ratio (ours / anchor).

    python benchmarks/bench_sft_packed_families.py [--steps 8] [--bins 4] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import _reset_accelerate, make_data
from report import emit, machine

MODEL_SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def run_ours(folder: Path, data_file: Path, steps: int, bins: int, max_length: int) -> float:
    from transformers import AutoModelForCausalLM

    from posttrain.tokenizer import load_tokenizer
    from posttrain.train.config import (
        CheckpointSettings,
        DataSettings,
        LoggingSettings,
        ModelSettings,
        OptimSettings,
        RunSettings,
        TrainConfig,
    )
    from posttrain.train.loop import Trainer
    from posttrain.train.run import build_items

    _reset_accelerate()
    cfg = TrainConfig(model=ModelSettings(path=str(folder / "base")),
                      data=DataSettings(train_files=[str(data_file)], max_length=max_length, packing=True),
                      optim=OptimSettings(lr=1e-3, per_device_batch_size=bins, max_steps=steps, schedule="constant"),
                      checkpoint=CheckpointSettings(output_dir=tempfile.mkdtemp(dir=folder), every_steps=0),
                      run=RunSettings(resume=None),
                      logging=LoggingSettings(progress=False))
    tok = load_tokenizer(str(folder / "base"))
    _, items = build_items(cfg, tok, "sft")
    model = AutoModelForCausalLM.from_pretrained(str(folder / "base"), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    trainer = Trainer(cfg, model, items, packed=True, pad_token_id=tok.pad_token_id)
    trainer.train_step(0)
    tokens, start = 0, time.perf_counter()
    for step in range(1, steps):
        tokens += trainer.train_step(step)["tokens"]
    return tokens / (time.perf_counter() - start)


def run_trl(folder: Path, rows: list[dict], steps: int, bins: int, max_length: int) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    _reset_accelerate()
    tok = AutoTokenizer.from_pretrained(str(folder / "base"))
    model = AutoModelForCausalLM.from_pretrained(str(folder / "base"), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    args = SFTConfig(output_dir=tempfile.mkdtemp(dir=folder), per_device_train_batch_size=bins, max_steps=steps,
                     learning_rate=1e-3, lr_scheduler_type="constant", assistant_only_loss=True, packing=True,
                     packing_strategy="bfd", padding_free=True, max_length=max_length, report_to=[],
                     save_strategy="no", logging_steps=10_000, use_cpu=True, dataloader_num_workers=0,
                     disable_tqdm=True, seed=0, bf16=False, fp16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    counts: list[int] = []
    ends: list[float] = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free: one row
        counts.append(int(batch["input_ids"].numel()))
        return batch

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    trainer.data_collator = counting
    trainer.add_callback(StepEnds())
    trainer.train()
    assert len(ends) == steps
    return sum(counts[1:steps]) / (ends[-1] - ends[0])


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--bins", type=int, default=4, help="packed bins per step (both sides)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.synthetic import arithmetic_corpus
    from posttrain.tokenizer import build_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="bench_sft_packed_"))
    tok = build_tokenizer(arithmetic_corpus(1000), vocab_size=512)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 bos_token_id=tok.bos_token_id, **MODEL_SHAPE)).save_pretrained(folder / "base")
    tok.save_pretrained(str(folder / "base"))
    rows = make_data(args.rows)
    data_file = folder / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    print(f"load average before: {load()}", flush=True)
    results: dict[str, list[float]] = {"ours": [], "trl": []}
    for r in range(args.rounds):
        results["ours"].append(run_ours(folder, data_file, args.steps, args.bins, args.max_length))
        results["trl"].append(run_trl(folder, rows, args.steps, args.bins, args.max_length))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in results.items()), flush=True)
    print(f"load average after: {load()}", flush=True)
    ours, anchor = max(results["ours"]), max(results["trl"])
    print(machine(), flush=True)
    emit("sft_packed_llama_useful_tokens_per_s_vs_trl_packed_padding_free", ours, anchor, "tokens/s", True)


if __name__ == "__main__":
    main()
