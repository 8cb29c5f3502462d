"""GRPO step time and peak memory: posttrain's GRPO/DAPO loop against TRL's GRPOTrainer, on this CPU.

Both start from the same tiny hybrid weights (ours: ``HybridForCausalLM``; TRL: transformers'
``GraniteMoeHybridForCausalLM`` loaded from the same checkpoint, ``router_aux_loss_coef=0.0``, which TRL 1.16 needs
for this model), the same prompts and ``math`` reward, the same G, generation batch, completion length and number
of optimizer steps: TRL's ``loss_type="dapo"``, ``epsilon_high=0.28``, ``beta=0``, ``steps_per_generation`` =
our ``optim.mini_batches`` (so both take several optimizer steps per generation batch). Dynamic sampling is off
in ours so both do the same work. Each measurement runs in its own process (peak RSS is that process's), ours
and TRL's interleaved because the machine is shared. Ends with JSON lines ``name, ours, anchor, unit, ratio``
(ratio = anchor / ours: how many times faster / smaller ours is). Nothing is downloaded.

``--quality-seconds N`` adds the quality run: a tiny model fine-tuned on additions with 40% wrong answers (the
set-up of tests/test_grpo_learning.py) is trained by each side for N seconds of wall clock from the same
checkpoint, and both results are scored the same way (posttrain's engine, 4 samples per held-out prompt at
temperature 1, the ``math`` verifier) on held-out prompts disjoint from the training ones (ratio = ours / anchor).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_checkpoint(folder: Path) -> None:
    import torch

    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import build_tokenizer

    tokenizer = build_tokenizer([f"{a}+{b}={a + b}" for a in range(100) for b in range(10)], vocab_size=64)
    config = preset("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    HybridForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))


def prompt_rows(n: int = 256) -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(0, 9)
        out.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return out


def run_ours(args, model_dir: Path, out_dir: Path) -> float:
    from posttrain.rewards import RewardsConfig, RewardSpec

    from posttrain.grpo.config import (
        CheckpointConfig,
        DynamicSamplingConfig,
        GrpoConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        RolloutConfig,
        RunConfig,
    )
    from posttrain.grpo.loss import LossConfig
    from posttrain.grpo.trainer import GrpoTrainer

    config = GrpoConfig(
        model=ModelConfig(path=str(model_dir)),
        rollout=RolloutConfig(prompts_per_step=args.prompts, num_generations=args.G, max_new_tokens=args.max_new),
        dynamic_sampling=DynamicSamplingConfig(enabled=False), loss=LossConfig("dapo"),
        rewards=RewardsConfig([RewardSpec("math")], num_workers=0),
        optim=OptimConfig(lr=1e-5, mini_batches=args.mini_batches),
        checkpoint=CheckpointConfig(output_dir=str(out_dir)), run=RunConfig(steps=args.steps),
        logging=LoggingConfig(progress=False))
    trainer = GrpoTrainer(config, rows=prompt_rows())
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    return time.perf_counter() - start


def run_trl(args, model_dir: Path, out_dir: Path) -> float:
    from datasets import Dataset
    from posttrain.rewards import get
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), router_aux_loss_coef=0.0)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    per_step = args.prompts * args.G // args.mini_batches
    config = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=per_step, steps_per_generation=args.mini_batches,
        gradient_accumulation_steps=1, num_generations=args.G, max_completion_length=args.max_new,
        loss_type="dapo", epsilon_high=0.28, beta=0.0, learning_rate=1e-5, max_steps=args.steps * args.mini_batches,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, temperature=1.0, top_k=0, top_p=1.0,
        bf16=False, fp16=False, disable_tqdm=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[get("math")], args=config,
                          train_dataset=Dataset.from_list(prompt_rows()), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def quality_split():
    pairs = [(a, b) for a in range(100) for b in range(5)]
    random.Random(0).shuffle(pairs)
    to_row = lambda ab: {"prompt": f"{ab[0]}+{ab[1]}=", "answer": str(ab[0] + ab[1])}
    return [to_row(p) for p in pairs[100:]], [to_row(p) for p in pairs[:100]]


def build_noisy_checkpoint(folder: Path, steps: int = 300) -> None:
    import torch

    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import build_tokenizer

    train, _ = quality_split()
    tok = build_tokenizer([f"{a}+{b}={a + b}" for a in range(100) for b in range(5)], vocab_size=64)
    config = preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    bos_token_id=None, hidden_size=64, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16,
                    shared_intermediate_size=128, num_hidden_layers=4, mamba_chunk_size=16,
                    layer_types=["mamba", "mamba", "attention", "mamba"])
    torch.manual_seed(0)
    model = HybridForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(steps):
        ids, labels, positions = [], [], []
        for row in (rng.choice(train) for _ in range(64)):
            answer = int(row["answer"]) + (rng.choice([-1, 1]) if rng.random() < 0.4 else 0)
            prompt, completion = tok.encode(row["prompt"]), tok.encode(str(answer)) + [tok.eos_token_id]
            ids += prompt + completion
            labels += [-100] * len(prompt) + completion
            positions += list(range(len(prompt) + len(completion)))
        loss = model(torch.tensor([ids]), position_ids=torch.tensor([positions]), labels=torch.tensor([labels]),
                     return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    tok.save_pretrained(str(folder))


def held_out_accuracy(folder: Path) -> float:
    from posttrain.rewards import get

    from posttrain.models.hybrid import HybridForCausalLM
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.native import NativeEngine
    from posttrain.tokenizer import load_tokenizer

    _, held = quality_split()
    model, tok = HybridForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder)
    outs = NativeEngine(model).generate([tok.encode(r["prompt"]) for r in held], SamplingParams(
        max_new_tokens=4, temperature=1.0, n=4, seed=123, eos_token_id=tok.eos_token_id))
    math = get("math")
    scores = [math.score(tok.decode(o.token_ids, skip_special_tokens=True), held[o.prompt_index]["answer"])
              for o in outs]
    return sum(scores) / len(scores)


def quality_ours(args, model_dir: Path, out_dir: Path) -> Path:
    from posttrain.rewards import RewardsConfig, RewardSpec

    from posttrain.grpo.config import (
        CheckpointConfig,
        GrpoConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        RolloutConfig,
        RunConfig,
    )
    from posttrain.grpo.trainer import GrpoTrainer

    config = GrpoConfig(
        model=ModelConfig(path=str(model_dir)),
        rollout=RolloutConfig(prompts_per_step=16, num_generations=8, max_new_tokens=4),
        rewards=RewardsConfig([RewardSpec("math")], num_workers=0),
        optim=OptimConfig(lr=args.quality_lr, mini_batches=2),
        checkpoint=CheckpointConfig(output_dir=str(out_dir)), run=RunConfig(steps=10_000),
        logging=LoggingConfig(progress=False))
    trainer = GrpoTrainer(config, rows=quality_split()[0])
    start = time.perf_counter()
    while time.perf_counter() - start < args.quality_seconds:
        trainer.step()
    print(f"ours: {trainer.step_count} generation steps", file=sys.stderr)
    return trainer.save_final()


def quality_trl(args, model_dir: Path, out_dir: Path) -> Path:
    from datasets import Dataset
    from posttrain.rewards import get
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class WallClock(TrainerCallback):
        def __init__(self):
            self.start = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            control.should_training_stop = time.perf_counter() - self.start >= args.quality_seconds

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), router_aux_loss_coef=0.0)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = GRPOConfig(
        output_dir=str(out_dir / "trl"), per_device_train_batch_size=64, steps_per_generation=2,
        gradient_accumulation_steps=1, num_generations=8, max_completion_length=4, loss_type="dapo",
        epsilon_high=0.28, beta=0.0, learning_rate=args.quality_lr, max_steps=100_000, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=10, temperature=1.0, top_k=0, top_p=1.0, disable_tqdm=True,
        lr_scheduler_type="constant")
    trainer = GRPOTrainer(model=model, reward_funcs=[get("math")], args=config, callbacks=[WallClock()],
                          train_dataset=Dataset.from_list(quality_split()[0]), processing_class=tokenizer)
    trainer.train()
    print(f"trl: {trainer.state.global_step} optimizer steps", file=sys.stderr)
    final = out_dir / "final"
    trainer.model.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    return final


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.child.endswith("quality"):
        with tempfile.TemporaryDirectory() as tmp:
            run = quality_ours if args.child == "ours-quality" else quality_trl
            final = run(args, Path(args.model), Path(tmp))
            print("RESULT " + json.dumps({"accuracy": held_out_accuracy(final)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        run = run_ours if args.child == "ours" else run_trl
        seconds = run(args, Path(args.model), Path(tmp))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": seconds, "optimizer_steps": args.steps * args.mini_batches,
                                  "peak_mib": peak_mib}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="generation steps")
    p.add_argument("--prompts", type=int, default=4, help="prompts per generation batch")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--mini-batches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quality-seconds", type=float, default=0.0, help="wall-clock budget of the quality run")
    p.add_argument("--quality-lr", type=float, default=2e-3)
    p.add_argument("--child", choices=["ours", "trl", "ours-quality", "trl-quality"])
    p.add_argument("--model")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    results: dict[str, list[dict]] = {"ours": [], "trl": []}

    def launch(who: str, extra: list[str]) -> dict:
        proc = subprocess.run([sys.executable, __file__, "--child", who, *extra], capture_output=True, text=True,
                              check=False, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{who} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        result = json.loads(line[-1][7:])
        print(f"{who}: {result}", file=sys.stderr)
        return result

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_checkpoint(model_dir)
        common = ["--steps", str(args.steps), "--prompts", str(args.prompts), "--G", str(args.G), "--max-new",
                  str(args.max_new), "--mini-batches", str(args.mini_batches), "--threads", str(args.threads),
                  "--model", str(model_dir)]
        for _ in range(args.repeats):
            for who in ("ours", "trl"):  # interleaved: the machine is shared
                results[who].append(launch(who, common))
        quality = {}
        if args.quality_seconds > 0:
            noisy = Path(tmp) / "noisy"
            build_noisy_checkpoint(noisy)
            base = held_out_accuracy(noisy)
            extra = ["--model", str(noisy), "--quality-seconds", str(args.quality_seconds), "--quality-lr",
                     str(args.quality_lr), "--threads", str(args.threads)]
            quality = {who: launch(f"{who}-quality", extra)["accuracy"] for who in ("ours", "trl")}
            print(f"held-out accuracy of the starting checkpoint: {base:.3f}", file=sys.stderr)
    step = {k: statistics.median(r["seconds"] / r["optimizer_steps"] for r in v) for k, v in results.items()}
    peak = {k: max(r["peak_mib"] for r in v) for k, v in results.items()}
    shape = f"G={args.G}, {args.prompts} prompts, {args.max_new} new tokens, {args.mini_batches} mini-batches"
    print(json.dumps({"name": f"grpo_optimizer_step_time ({shape})", "ours": round(step["ours"], 4),
                      "anchor": round(step["trl"], 4), "unit": "s", "ratio": round(step["trl"] / step["ours"], 3)}))
    print(json.dumps({"name": "grpo_peak_rss", "ours": round(peak["ours"], 1), "anchor": round(peak["trl"], 1),
                      "unit": "MiB", "ratio": round(peak["trl"] / peak["ours"], 3)}))
    if quality:
        print(json.dumps({"name": f"grpo_held_out_accuracy_after_{args.quality_seconds:g}s", "ours":
                          round(quality["ours"], 4), "anchor": round(quality["trl"], 4), "unit": "accuracy",
                          "ratio": round(quality["ours"] / max(quality["trl"], 1e-9), 3)}))


if __name__ == "__main__":
    main()
