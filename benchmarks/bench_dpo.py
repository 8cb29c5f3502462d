"""DPO step time: ``posttrain dpo``'s trainer against TRL's ``DPOTrainer`` on the same tiny hybrid, on this CPU.

Both train the same weights (ours: the in-tree ``HybridForCausalLM``; TRL: transformers'
``GraniteMoeHybridForCausalLM`` loaded from the same saved checkpoint) on the same preference pairs (GSM8K-format
arithmetic: the worked answer against one with a wrong result), sigmoid loss, beta 0.1, the same pairs per step,
learning rate, float32 and thread count. Two measures, each like for like:

- reference on the fly: TRL's default (a frozen reference copy scored every step) against ours with
  ``loss.reference: on_the_fly``;
- reference precomputed: TRL's ``precompute_ref_log_probs`` against ours (the default); the precomputation
  itself is outside the timed steps for both.

Ours packs each micro-batch's chosen and rejected sequences into one padding-free row and scores them with the
fused chunked log-prob kernel; TRL pads (its padding-free path needs flash attention). Runs are interleaved (ours,
TRL, ours, TRL, ...) so a shared machine's load hits both alike; a step's time is the median over the timed steps
of a run (the first step is a warm-up and not timed), and the best run of each is reported. Ends with one JSON
line per measure via ``report.emit`` (ratio = TRL's time / ours).

    python benchmarks/bench_dpo.py [--steps 8] [--batch 8] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, machine


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    from posttrain.synthetic import arithmetic_problem

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = arithmetic_problem(rng)
        wrong = p["answer"].rsplit("#### ", 1)[0] + f"#### {rng.randint(100, 999)}"
        rows.append({"prompt": f"Question: {p['question']}\nAnswer:", "chosen": " " + p["answer"],
                     "rejected": " " + wrong})
    return rows


def _reset_accelerate() -> None:
    """Each trainer builds its own Accelerator in this one process; forget the previous one's settings."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def run_ours(folder: Path, data_file: Path, steps: int, batch: int, max_length: int, reference: str) -> float:
    from transformers import AutoTokenizer

    from posttrain.config import load_config
    from posttrain.dpo.config import DpoConfig
    from posttrain.dpo.data import load_pairs
    from posttrain.dpo.trainer import DpoTrainer
    from posttrain.models.hybrid import HybridForCausalLM

    _reset_accelerate()
    out = Path(tempfile.mkdtemp(dir=folder))
    cfg = load_config(DpoConfig, None, [
        f"--model.path={folder / 'base'}", f"--data.train_files=[{data_file}]", f"--data.max_length={max_length}",
        "--optim.lr=1e-4", f"--optim.per_device_batch_size={batch}", f"--optim.max_steps={steps + 1}",
        "--optim.schedule=constant", "--optim.max_grad_norm=1.0", "--loss.beta=0.1", f"--loss.reference={reference}",
        f"--checkpoint.output_dir={out}", "--checkpoint.every_steps=0", "--run.resume=null",
        "--logging.progress=false", f"--eval.batch_size={batch}"])
    tok = AutoTokenizer.from_pretrained(str(folder / "base"))
    pairs = load_pairs([data_file], tok, max_length=max_length)
    trainer = DpoTrainer(cfg, HybridForCausalLM.from_pretrained(folder / "base"), pairs, pad_token_id=tok.pad_token_id)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        trainer.train_step(step)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run_trl(folder: Path, rows: list[dict], steps: int, batch: int, max_length: int, precompute: bool) -> float:
    from datasets import Dataset
    from transformers import AutoTokenizer, GraniteMoeHybridForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    _reset_accelerate()
    tok = AutoTokenizer.from_pretrained(str(folder / "base"))
    model = GraniteMoeHybridForCausalLM.from_pretrained(str(folder / "base"), dtype=torch.float32)
    args = DPOConfig(output_dir=tempfile.mkdtemp(dir=folder), per_device_train_batch_size=batch,
                     max_steps=steps + 1, learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=1.0,
                     beta=0.1, loss_type=["sigmoid"], max_length=max_length, precompute_ref_log_probs=precompute,
                     precompute_ref_batch_size=batch, report_to=[], save_strategy="no", logging_steps=10_000,
                     use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=False, fp16=False,
                     # TRL's fused forward reads config.num_experts, which GraniteMoeHybridConfig lacks: without this
                     # it crashes on the hybrid (the dense tiny model has no experts, so nothing is lost)
                     router_aux_loss_coef=0.0)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[StepTimer()])
    trainer.train()
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run (after one warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.synthetic import arithmetic_corpus
    from posttrain.tokenizer import build_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    tok = build_tokenizer(arithmetic_corpus(1000), vocab_size=512)
    torch.manual_seed(0)
    model = HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, bos_token_id=None))
    model.save_pretrained(folder / "base")
    tok.save_pretrained(str(folder / "base"))
    rows = make_pairs(args.batch * (args.steps + 1))
    data_file = folder / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    results: dict[str, list[float]] = {"ours_fly": [], "trl_fly": [], "ours_pre": [], "trl_pre": []}
    for r in range(args.rounds):
        results["ours_fly"].append(run_ours(folder, data_file, args.steps, args.batch, args.max_length, "on_the_fly"))
        results["trl_fly"].append(run_trl(folder, rows, args.steps, args.batch, args.max_length, False))
        results["ours_pre"].append(run_ours(folder, data_file, args.steps, args.batch, args.max_length, "precomputed"))
        results["trl_pre"].append(run_trl(folder, rows, args.steps, args.batch, args.max_length, True))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms/step" for k, v in results.items()),
              flush=True)
    best = {k: min(v) for k, v in results.items()}
    conditions = {"machine": machine(), "pairs_per_step": args.batch, "steps": args.steps, "rounds": args.rounds}
    emit("dpo_step_time_ref_on_the_fly", best["ours_fly"], best["trl_fly"], "s/step", False, **conditions)
    emit("dpo_step_time_ref_precomputed", best["ours_pre"], best["trl_pre"], "s/step", False, **conditions)


if __name__ == "__main__":
    main()
