"""Building a small byte-level BPE tokenizer with Granite's chat format, with no hub access.

Tiny models, tests and the demo need a tokenizer, and nothing may be downloaded at run time. ``build_tokenizer``
trains one with the ``tokenizers`` library on a corpus (digits split one by one, so arithmetic is learnable) and
wraps it as a transformers fast tokenizer with a Granite-style chat template: role markers
``<|start_of_role|>user<|end_of_role|>...<|end_of_text|>``, tools in the system turn, tool calls as
``<tool_call>{json}</tool_call>``, and assistant turns inside ``{% generation %}`` blocks so that
``return_assistant_tokens_mask`` marks exactly the tokens SFT trains on. This module never trains models.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

START_OF_ROLE = "<|start_of_role|>"
END_OF_ROLE = "<|end_of_role|>"
END_OF_TEXT = "<|end_of_text|>"
PAD = "<|pad|>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
SPECIAL_TOKENS = [END_OF_TEXT, PAD, START_OF_ROLE, END_OF_ROLE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE]

# Assistant turns (content, tool calls, the closing <|end_of_text|>) are generation blocks; tool results are role "tool".
CHAT_TEMPLATE = (
    "{% if tools %}"
    "<|start_of_role|>system<|end_of_role|>You can call these tools. To call one, answer with "
    "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.{{ '\\n' }}<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ (tool.function if tool.function is defined else tool) | tojson }}{% endfor %}"
    "{{ '\\n' }}</tools><|end_of_text|>{{ '\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}"
    "<|start_of_role|>assistant<|end_of_role|>"
    "{% generation %}"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls or [] %}"
    "{% set f = call.function if call.function is defined else call %}"
    "<tool_call>{\"name\": \"{{ f.name }}\", \"arguments\": "
    "{% if f.arguments is string %}{{ f.arguments }}{% else %}{{ f.arguments | tojson }}{% endif %}}</tool_call>"
    "{% endfor %}"
    "<|end_of_text|>"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "<|start_of_role|>{{ message.role }}<|end_of_role|>{{ message.content }}<|end_of_text|>{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast`` with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END_OF_TEXT, pad_token=PAD, bos_token=None, unk_token=None,
        additional_special_tokens=[START_OF_ROLE, END_OF_ROLE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE],
        model_max_length=1 << 20, padding_side="left",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a folder (or named on the hub); ``FileNotFoundError`` naming the folder when there is
    none, instead of transformers' guesses about a slow tokenizer to convert."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)})")
    if not folder.exists() and (str(path).startswith((".", "/", "~")) or str(path).count("/") > 1):
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except OSError as e:  # a hub name that is not there, or no network
        raise FileNotFoundError(f"cannot load tokenizer {str(path)!r}: {str(e).splitlines()[0]}") from None


def completion_text(tokenizer, ids: list[int]) -> str:
    """The text a model wrote, markup included (``<tool_call>`` tags are special tokens, and a call does not parse
    without them), less the end-of-sequence and padding tokens that close it: what rewards, judges and preference
    pairs read."""
    closing = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    end = len(ids)
    while end and ids[end - 1] in closing:
        end -= 1
    return tokenizer.decode(ids[:end], skip_special_tokens=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, nargs="+", help="text files (one document per line)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--out", required=True, help="folder to write the tokenizer to")


def run(args: argparse.Namespace) -> int:
    lines: list[str] = []
    for path in args.corpus:
        p = Path(path)
        if not p.is_file():
            raise SystemExit(f"posttrain tokenizer: no such corpus file: {p}")
        lines.extend(line for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    tok = build_tokenizer(lines, vocab_size=args.vocab_size)
    tok.save_pretrained(args.out)
    print(f"wrote a {len(tok)}-token tokenizer to {args.out}")
    return 0
