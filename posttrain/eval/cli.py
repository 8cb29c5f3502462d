"""``posttrain eval``: pass@k of a checkpoint on GSM8K, HumanEval and BFCL from local files.

Reads the checkpoint folder (weights and tokenizer together), generates on a rollout engine (``--engine``; default
native for the in-tree models, transformers for any other causal LM; vLLM on request), scores with ``posttrain.rewards``, prints a table and writes the results JSON plus the
samples. It never downloads anything and never changes the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posttrain.eval.completions import EngineCompletions, EvalSampling
from posttrain.eval.runner import EvalConfig, evaluate, results_json, results_table, write_results
from posttrain.eval.tasks import ALIASES, TASKS, DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (weights, config.json, tokenizer files)")
    parser.add_argument("--data-dir", required=True,
                        help="folder in the layout of ../shared/data: gsm8k/, humaneval/, bfcl/")
    parser.add_argument("--tasks", default="gsm8k,humaneval,bfcl",
                        help=f"comma-separated: {', '.join([*TASKS, *ALIASES])} (default gsm8k,humaneval,bfcl)")
    parser.add_argument("--split", default="test", help="GSM8K split file (default test)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items of each task (each BFCL category is a task)")
    parser.add_argument("--n", type=int, default=1, help="samples per item (default 1)")
    parser.add_argument("--k", default="1", help="comma-separated k values for pass@k, each <= n (default 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default=None,
                        help="rollout engine: native, transformers or vllm (default: native for the in-tree models, "
                             "else transformers)")
    parser.add_argument("--prompt-format", choices=["auto", "chat", "plain"], default="auto",
                        help="chat template or plain text prompts (auto: chat when the tokenizer has a template)")
    parser.add_argument("--batch-size", type=int, default=32, help="items per engine call")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reward-timeout", type=float, default=30.0, help="seconds per sample for math/tool rewards")
    parser.add_argument("--out", default="eval_results.json",
                        help="results JSON (samples go beside it as <stem>.samples.jsonl)")


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise SystemExit(f"posttrain eval: {flag} takes comma-separated integers, got {text!r}") from exc


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    try:
        sampling = EvalSampling(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
        config = EvalConfig(data_dir=args.data_dir, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                            split=args.split, limit=args.limit, sampling=sampling, ks=_ints(args.k, "--k"),
                            reward_timeout_s=args.reward_timeout)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"posttrain eval: {exc}") from exc
    from posttrain.rollout import EngineError
    from posttrain.serving.generation import load_checkpoint, read_model_config

    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise SystemExit(f"posttrain eval: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    try:
        tokenizer, rollout = load_checkpoint(args.model, args.engine, device=args.device, dtype=args.dtype,
                                             seed=args.seed)
    except EngineError as exc:  # a bad --engine: one line, exit code 2, before any weights load
        print(f"posttrain eval: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"posttrain eval: {exc}") from exc
    try:
        engine = EngineCompletions(rollout, tokenizer, read_model_config(args.model), args.prompt_format,
                                   args.batch_size)
        results = evaluate(config, engine)
    except (FileNotFoundError, ValueError, DataError) as exc:
        raise SystemExit(f"posttrain eval: {exc}") from exc
    finally:
        if rollout.capabilities.close:
            rollout.close()
    summary = results_json(config, results, str(args.model), engine.name, engine.prompt_format)
    out = Path(args.out)
    samples = write_results(out, summary, results)
    console = Console()
    console.print(results_table(results, config.ks))
    console.print(f"results: {out}  samples: {samples}")
    return 0
