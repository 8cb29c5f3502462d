"""Local judge backends: transformers with a tiny checkpoint built here, and vLLM's clear error when it is absent."""

from __future__ import annotations

import importlib.util

import pytest
from posttrain.judges.backends import JudgeBackendError, TransformersBackend, VLLMBackend
from posttrain.judges.config import BackendConfig, JudgeConfig, SamplingConfig
from posttrain.judges.judge import Judge

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_judge")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in ["{", "}", '"score":', "7", "8", "rationale", "good", "the", "answer", "is", "<|user|>",
                 "<|assistant|>", "What", "2", "+", "?", "4"]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_transformers_backend_generates_and_caches(tiny_checkpoint, tmp_path):
    config = JudgeConfig(enabled=True, backend=BackendConfig(type="transformers", model=str(tiny_checkpoint),
                                                             batch_size=2),
                         sampling=SamplingConfig(max_tokens=6), on_unparseable="keep")
    judge = Judge(config, tmp_path / "cache.sqlite")
    assert isinstance(judge.backend, TransformersBackend)
    prompts, responses = ["What is 2 + 2 ?", "What is 2 + 2 ?", "the answer"], ["4", "8", "7"]
    first = judge.score(prompts, responses)
    assert judge.client.sent == 3 and len(judge.cache) == 3
    # greedy decoding of a fixed checkpoint: the same prompts give the same answers, and come from the cache
    again = judge.score(prompts, responses)
    assert [v.raw for v in again] == [v.raw for v in first]
    assert judge.client.sent == 3 and judge.client.cached == 3
    # the answers are what the model generates for the rendered rubric, at most max_tokens new tokens each
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert all(len(tok(v.raw, add_special_tokens=False)["input_ids"]) <= 6 for v in first)
    judge.close()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the error shown when vLLM is absent")
def test_vllm_backend_without_vllm_is_a_clear_error():
    with pytest.raises(JudgeBackendError, match=r"pip install 'posttrain\[vllm\]'"):
        VLLMBackend(BackendConfig(type="vllm", model="some/model"))
