"""The whole pipeline from Python, with the same components the CLI runs: tokenizer, pre-training, filtering,
SFT, GRPO with the DAPO loss, signed export, verification. CPU, no network.

    python examples/python_api/pipeline.py --out runs/api            # a few minutes on 2 cores
    python examples/python_api/pipeline.py --out runs/api --scale 0.1   # a quick look (what the test runs)

Each stage is one call on a config dataclass (the same dataclasses the recipes load into), and each writes into
its own folder under --out. The task: word problems with small sums (posttrain.synthetic), answers ending in
``#### n``, checked by the ``math`` reward.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/api")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every step count (0.1: a quick run)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def steps(n: int) -> int:
        return max(1, round(n * args.scale))

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))

    # 1. data: chats with a reference answer; some answers are wrong, as in data nobody has checked
    from posttrain.synthetic import arithmetic_corpus, arithmetic_problem

    rng = random.Random(0)
    problems = [arithmetic_problem(rng, max_operand=20) for _ in range(300)]
    rows = []
    for i, p in enumerate(problems[:200]):
        answer = p["answer"] if i % 10 else p["answer"].rsplit("#### ", 1)[0] + "#### 999"
        rows.append({"messages": [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": answer}],
                     "answer": p["answer"]})
    (out / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [{"prompt": [{"role": "user", "content": p["question"]}], "answer": p["answer"]} for p in problems[200:]]
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))

    # 2. tokenizer, and a tiny hybrid pre-trained from scratch
    from posttrain.tokenizer import build_tokenizer
    from posttrain.train.config import (
        CheckpointSettings,
        DataSettings,
        LoggingSettings,
        ModelSettings,
        OptimSettings,
        TrainConfig,
    )
    from posttrain.train.run import run_training

    corpus = arithmetic_corpus(2000)
    (out / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    build_tokenizer(corpus, vocab_size=400).save_pretrained(out / "tokenizer")
    quiet = LoggingSettings(progress=False)
    run_training(TrainConfig(
        model=ModelSettings(preset="tiny", tokenizer=str(out / "tokenizer")),
        data=DataSettings(train_files=[str(out / "corpus.jsonl")], format="text", max_length=128),
        optim=OptimSettings(lr=3e-3, per_device_batch_size=8, max_steps=steps(100), schedule="wsd",
                            warmup_steps=steps(5)),
        checkpoint=CheckpointSettings(output_dir=str(out / "pretrain"), every_steps=0, resume=False),
        logging=quiet), "pretrain")

    # 3. filter: chat structure, answer verification against the reference, exact and near dedup
    from posttrain.judges.config import config_from_dict
    from posttrain.judges.pipeline import run_filter

    report = run_filter(config_from_dict({
        "rules": [{"name": "chat_structure"},
                  {"name": "verify_answer", "reward": "math", "reward_options": {"answer_column": "answer"}}],
        "dedup": {"exact": True, "near": {"ngram": 3, "threshold": 0.9}},
    }), out / "candidates.jsonl", out / "filter", show_progress=False)
    print(f"filter kept {report.kept} of {report.total} (rejected by rule: {report.rejected_by})")

    # 4. SFT on what the filter kept
    run_training(TrainConfig(
        model=ModelSettings(path=str(out / "pretrain" / "final")),
        data=DataSettings(train_files=[str(out / "filter" / "kept.jsonl")], format="messages", max_length=128),
        optim=OptimSettings(lr=2e-3, per_device_batch_size=8, max_steps=steps(80), warmup_steps=steps(5)),
        checkpoint=CheckpointSettings(output_dir=str(out / "sft"), every_steps=0, resume=False),
        logging=quiet), "sft")

    # 5. GRPO with the DAPO loss, rewarded by the math verifier
    from posttrain.rewards import RewardsConfig

    from posttrain.grpo.config import (
        DataConfig,
        EvalConfig,
        GrpoConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        RolloutConfig,
        RunConfig,
    )
    from posttrain.grpo.trainer import GrpoTrainer

    history = GrpoTrainer(GrpoConfig(
        model=ModelConfig(path=str(out / "sft" / "final")),
        data=DataConfig(path=str(out / "prompts.jsonl"), max_prompt_tokens=128),
        rollout=RolloutConfig(prompts_per_step=8, num_generations=4, max_new_tokens=32),
        rewards=RewardsConfig(rewards=[{"name": "math"}], num_workers=0),
        optim=OptimConfig(lr=1e-4, mini_batches=2),
        eval=EvalConfig(path=str(out / "prompts.jsonl"), max_prompts=32),
        checkpoint=CheckpointSettings(output_dir=str(out / "grpo"), every_steps=0),
        run=RunConfig(steps=steps(30)),
        logging=LoggingConfig(progress=False),
    )).train()
    print(f"GRPO: {len(history)} steps, last train accuracy {history[-1]['accuracy']:.3f}")

    # 6. signed export, then verification of every hash, the signature and the signer (our own public key)
    from posttrain.export import export_checkpoint, generate_key, load_private_key, public_pem
    from posttrain.verify import verify_checkpoint

    if not (out / "signing_key.pem").exists():
        generate_key(out / "signing_key.pem")
    (out / "signing_key.pub.pem").write_bytes(public_pem(load_private_key(out / "signing_key.pem")))
    exported = export_checkpoint(out / "grpo" / "final", out / "export", out / "signing_key.pem")
    problems_found = verify_checkpoint(exported, public_key=out / "signing_key.pub.pem")
    if problems_found:
        raise SystemExit(f"verification failed: {problems_found}")
    print(f"signed instruct checkpoint in {exported}; signature valid and made by our key")


if __name__ == "__main__":
    main()
