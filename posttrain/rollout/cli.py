"""``posttrain generate``: sample completions from a checkpoint folder (weights + tokenizer) on a rollout engine
(``--engine``; default: native for the in-tree models, transformers for any other causal LM). A bad engine choice
is one line on stderr and exit code 2, before any weights load. This module only parses and prints."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="folder with config.json, safetensors and the tokenizer")
    parser.add_argument("prompts", nargs="+", help="prompt texts")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("-n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object per completion")
    parser.add_argument("--engine", default=None,
                        help="native, transformers or vllm (default: native for the in-tree models, else transformers)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    from posttrain.rollout import EngineError, SamplingParams
    from posttrain.serving.generation import load_checkpoint

    try:
        tokenizer, engine = load_checkpoint(args.checkpoint, args.engine, device=args.device, dtype=args.dtype,
                                            seed=args.seed or 0)
    except (EngineError, FileNotFoundError) as e:
        print(f"posttrain generate: {e}", file=sys.stderr)
        return 2
    if args.chat:
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for p in args.prompts]
    else:
        ids = [tokenizer(p)["input_ids"] for p in args.prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, n=args.n, seed=args.seed, eos_token_id=tokenizer.eos_token_id)
    try:
        completions = engine.generate(ids, params)
    finally:
        if engine.capabilities.close:
            engine.close()
    for c in completions:
        text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt_index": c.prompt_index, "text": text, "finish_reason": c.finish_reason,
                              "num_tokens": len(c.token_ids)}))
        else:
            print(f"[{c.prompt_index}] {args.prompts[c.prompt_index]!r} -> {text!r} ({c.finish_reason})")
    return 0
