"""Synthetic corpora and a tiny trained model, built locally: what tests, benchmarks and the demo start from.

Nothing here downloads anything. ``arithmetic_corpus`` writes GSM8K-format arithmetic (question, worked answer,
``#### n``) and plain sentences; ``tiny_model`` builds the tokenizer and the ``tiny`` hybrid on it and trains it
for a few seconds so that greedy decoding is not decided by near-ties. Real training goes through the trainers;
this is only the warm-up of a throwaway model.
"""

from __future__ import annotations

import random

import torch

from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.tokenizer import build_tokenizer

_NOUNS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells"]
_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gia", "Hugo"]


def arithmetic_problem(rng: random.Random, max_operand: int = 49) -> dict[str, str]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    name, noun = rng.choice(_NAMES), rng.choice(_NOUNS)
    if rng.random() < 0.5 or a < b:
        question = f"{name} has {a} {noun} and gets {b} more. How many {noun} does {name} have?"
        answer = f"{name} has {a} + {b} = {a + b} {noun}.\n#### {a + b}"
    else:
        question = f"{name} has {a} {noun} and gives away {b}. How many {noun} are left?"
        answer = f"{name} has {a} - {b} = {a - b} {noun} left.\n#### {a - b}"
    return {"question": question, "answer": answer}


def arithmetic_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    problems = [arithmetic_problem(rng) for _ in range(n)]
    return [f"Question: {p['question']}\nAnswer: {p['answer']}" for p in problems]


def tiny_model(steps: int = 60, seed: int = 0, rope: bool = False, moe: bool = False, seq_len: int = 96,
               batch: int = 16):
    """A tokenizer and a briefly trained ``tiny`` hybrid (about 10 s on 2 CPU cores for 60 steps)."""
    torch.manual_seed(seed)
    texts = arithmetic_corpus(4000, seed=seed)
    tokenizer = build_tokenizer(texts, vocab_size=512)
    config = preset("tiny-moe" if moe else "tiny", vocab_size=len(tokenizer),
                    position_embedding_type="rope" if rope else None,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = HybridForCausalLM(config)
    stream = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    data = torch.tensor(stream[: (len(stream) // seq_len) * seq_len]).view(-1, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]
        loss = model(rows, labels=rows, return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return tokenizer, model
