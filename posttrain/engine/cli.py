"""``posttrain generate``: sample completions from a checkpoint folder (weights + tokenizer) with the native engine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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


def run(args: argparse.Namespace) -> int:
    from posttrain.engine import NativeEngine, SamplingParams
    from posttrain.models.hybrid import HybridForCausalLM
    from posttrain.tokenizer import load_tokenizer

    folder = Path(args.checkpoint)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"posttrain generate: {folder} has no config.json")
    tokenizer = load_tokenizer(folder)
    model = HybridForCausalLM.from_pretrained(folder)
    if args.chat:
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for p in args.prompts]
    else:
        ids = [tokenizer(p)["input_ids"] for p in args.prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, n=args.n, seed=args.seed, eos_token_id=tokenizer.eos_token_id)
    for c in NativeEngine(model).generate(ids, params):
        text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt_index": c.prompt_index, "text": text, "finish_reason": c.finish_reason,
                              "num_tokens": len(c.token_ids)}))
        else:
            print(f"[{c.prompt_index}] {args.prompts[c.prompt_index]!r} -> {text!r} ({c.finish_reason})")
    return 0
