"""SFT throughput: ``posttrain``'s trainer against TRL's ``SFTTrainer`` on the same tiny hybrid, on this CPU.

Both train the same weights (ours: the in-tree ``HybridForCausalLM``; TRL: transformers'
``GraniteMoeHybridForCausalLM`` loaded from the same checkpoint) on the same generated GSM8K-format chat data with
assistant-only loss, the same batch size, steps, learning rate and thread count. Runs are interleaved
(ours, TRL, ours, TRL, ...) so a shared machine's load hits both alike; the best round of each is reported.
Measures: non-pad tokens per second unpadded (ours vs TRL), and ours packed (padding-free) vs TRL unpadded. TRL
cannot pack this model on CPU (its padding-free path needs flash attention / mamba_ssm). Ends with one JSON line
per measure: name, ours, anchor, unit, ratio (ours / anchor for throughputs).

    python benchmarks/bench_sft.py [--steps 8] [--batch 8] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch


def make_data(n: int, seed: int = 0) -> list[dict]:
    from posttrain.synthetic import arithmetic_problem

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = arithmetic_problem(rng)
        rows.append({"messages": [{"role": "user", "content": p["question"]},
                                  {"role": "assistant", "content": p["answer"]}]})
    return rows


def _reset_accelerate() -> None:
    """Each trainer builds its own Accelerator in this one process; forget the previous one's settings."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def run_ours(folder: Path, data_file: Path, tok_dir: Path, steps: int, batch: int, packed: bool, max_length: int):
    from posttrain.models.hybrid import HybridForCausalLM
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
    out = Path(tempfile.mkdtemp(dir=folder))
    cfg = TrainConfig(model=ModelSettings(path=str(folder / "base")),
                      data=DataSettings(train_files=[str(data_file)], max_length=max_length, packing=packed),
                      optim=OptimSettings(lr=1e-3, per_device_batch_size=batch, max_steps=steps),
                      checkpoint=CheckpointSettings(output_dir=str(out), every_steps=0),
                      run=RunSettings(resume=None),
                      logging=LoggingSettings(progress=False))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    _, items = build_items(cfg, tok, "sft")
    if packed:  # bins hold several sequences: use as many bins per step as keep the same tokens per step
        cfg.optim.per_device_batch_size = max(1, round(batch * max_length / 2 / max_length))
    model = HybridForCausalLM.from_pretrained(folder / "base")
    trainer = Trainer(cfg, model, items, packed=packed, pad_token_id=tok.pad_token_id)
    tokens = 0
    start = time.perf_counter()
    for step in range(steps):
        tokens += trainer.train_step(step)["tokens"]
    return tokens / (time.perf_counter() - start)


def run_trl(folder: Path, rows: list[dict], tok_dir: Path, steps: int, batch: int, max_length: int):
    from datasets import Dataset
    from transformers import AutoTokenizer, GraniteMoeHybridForCausalLM
    from trl import SFTConfig, SFTTrainer

    _reset_accelerate()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.padding_side = "right"
    model = GraniteMoeHybridForCausalLM.from_pretrained(str(folder / "base"), dtype=torch.float32)
    out = tempfile.mkdtemp(dir=folder)
    args = SFTConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
                     lr_scheduler_type="constant", assistant_only_loss=True, packing=False, max_length=max_length,
                     report_to=[], save_strategy="no", logging_steps=10_000, use_cpu=True, dataloader_num_workers=0,
                     disable_tqdm=True, seed=0, bf16=False, fp16=False,  # float32, as ours on CPU
                     # TRL's fused loss reads config.num_experts, which GraniteMoeHybridConfig lacks: without this it
                     # crashes on the hybrid (the dense tiny model has no experts, so nothing is lost)
                     router_aux_loss_coef=0.0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting(features):
        batch_ = collate(features)
        counted["tokens"] += int(batch_["attention_mask"].sum()) if "attention_mask" in batch_ else \
            int(batch_["input_ids"].numel())
        return batch_

    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    return counted["tokens"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.synthetic import arithmetic_corpus
    from posttrain.tokenizer import build_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    tok = build_tokenizer(arithmetic_corpus(1000), vocab_size=512)
    tok.save_pretrained(str(folder / "tok"))
    torch.manual_seed(0)
    model = HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, bos_token_id=None))
    model.save_pretrained(folder / "base")
    rows = make_data(args.rows)
    data_file = folder / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    results: dict[str, list[float]] = {"ours": [], "ours_packed": [], "trl": []}
    for r in range(args.rounds):
        results["ours"].append(run_ours(folder, data_file, folder / "tok", args.steps, args.batch, False,
                                        args.max_length))
        results["trl"].append(run_trl(folder, rows, folder / "tok", args.steps, args.batch, args.max_length))
        results["ours_packed"].append(run_ours(folder, data_file, folder / "tok", args.steps, args.batch, True,
                                               args.max_length))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in results.items()), flush=True)
    best = {k: max(v) for k, v in results.items()}
    for name, ours in (("sft_tokens_per_s_unpacked", best["ours"]),
                       ("sft_useful_tokens_per_s_packed_vs_trl_unpacked", best["ours_packed"])):
        print(json.dumps({"name": name, "ours": round(ours, 1), "anchor": round(best["trl"], 1), "unit": "tokens/s",
                          "ratio": round(ours / best["trl"], 3)}))


if __name__ == "__main__":
    main()
