"""Rule filters and their configuration: what each rule measures and rejects, and strict config loading."""

from __future__ import annotations

import json

import pytest
from posttrain.judges.config import ConfigError, config_from_dict, load_config
from posttrain.judges.rules import (
    build_rules,
    duplicate_line_fractions,
    duplicate_ngram_char_fraction,
    role_order_problem,
    top_ngram_char_fraction,
)
from posttrain.judges.samples import to_sample


def chat(*turns, **extra):
    return {"messages": [dict(t) for t in turns], **extra}


def check(rules_yaml: list[dict], rows: list[dict]):
    rules = build_rules(config_from_dict({"rules": rules_yaml}).rules)
    samples = [to_sample(i, f"mem:line {i + 1}", r) for i, r in enumerate(rows)]
    return [[rule.check(samples)[i] for rule in rules] for i in range(len(samples))]


def test_length_bounds_in_chars_and_whitespace_tokens():
    rows = [{"prompt": "q", "completion": "one two three"}, {"prompt": "q", "completion": "x" * 50}]
    (short,), (long_,) = check([{"name": "length", "min_tokens": 2, "max_chars": 20}], rows)
    assert short.passed and short.scores == {"length.chars": 13, "length.tokens_ws": 3}
    assert not long_.passed and long_.reasons == [
        "length: 50 chars > max_chars 20", "length: 1 whitespace tokens < min_tokens 2"]


def test_length_in_tokens_through_a_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split

    tok = Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Split("", "isolated")  # one token per character
    tok.save(str(tmp_path / "tokenizer.json"))
    (result,), = check([{"name": "length", "max_tokens": 5, "tokenizer": str(tmp_path)}],
                       [{"prompt": "q", "completion": "ab ab"}])
    assert result.scores["length.tokens"] == 5 and result.passed


def test_gopher_repetition_measures():
    assert duplicate_line_fractions("a\nb\na\na\n\n") == (0.5, 0.5)
    words = ["the", "cat", "sat", "the", "cat", "sat", "the", "cat", "sat", "on", "a", "mat"]
    total = sum(map(len, words))
    # "the cat" occurs 3 times: 3 * 6 chars over 31
    assert top_ngram_char_fraction(words, 2, total) == pytest.approx(18 / total)
    # 5-grams that repeat cover "the cat sat the cat sat the cat sat"
    assert duplicate_ngram_char_fraction(words, 5, total) == pytest.approx(len("thecatsatthecatsatthecatsat") / total)
    assert duplicate_ngram_char_fraction(["a", "b", "c", "d", "e", "f", "g", "h"], 5, 8) == 0.0


def test_repetition_rule_rejects_a_looping_answer_and_keeps_prose(shared_data):
    with open(shared_data / "gsm8k" / "train.jsonl") as fh:
        prose = " ".join(json.loads(next(fh))["question"] for _ in range(4))  # four different word problems
    loop = "I will compute the answer now. " * 30
    (kept,), (looping,) = check([{"name": "repetition"}], [{"prompt": "q", "completion": prose},
                                                           {"prompt": "q", "completion": loop}])
    assert len(prose.split()) >= 50 and kept.passed, kept.reasons
    assert not looping.passed and any("duplicate 5-gram" in r for r in looping.reasons)
    assert looping.scores["repetition.dup_5gram_frac"] > 0.9


def test_characters_and_language():
    rows = [
        {"prompt": "q", "completion": "The weather is lovely today and we are going for a long walk in the park."},
        {"prompt": "q", "completion": "Le temps est magnifique aujourd'hui et nous allons faire une longue promenade."},
        {"prompt": "q", "completion": "broken \ufffd decode with a bell \x07 in the middle of a sentence"},
    ]
    results = check([{"name": "characters"}, {"name": "language", "languages": ["en"]}], rows)
    (chars_en, lang_en), (chars_fr, lang_fr), (chars_bad, _) = results
    assert chars_en.passed and lang_en.passed and lang_en.scores["language.lang_en"] > 0.9
    assert chars_fr.passed and not lang_fr.passed and "language fr" in lang_fr.reasons[0]
    assert not chars_bad.passed and len(chars_bad.reasons) == 2


def test_chat_structure():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    good = chat({"role": "system", "content": "s"}, {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}, tools=tools)
    bad_order = chat({"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"})
    empty = chat({"role": "user", "content": "q"}, {"role": "assistant", "content": "  "})
    fence = chat({"role": "user", "content": "q"}, {"role": "assistant", "content": "```python\nprint(1)\n"})
    bad_json = chat({"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}]}, tools=tools)
    unknown = chat({"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "send_email", "arguments": "{}"}}]}, tools=tools)
    in_text = chat({"role": "user", "content": "q"}, {"role": "assistant", "content":
                   '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
                   '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'}, tools=tools)
    no_tools = chat({"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]})
    results = [r[0] for r in check([{"name": "chat_structure"}],
                                   [good, bad_order, empty, fence, bad_json, unknown, in_text, no_tools])]
    assert results[0].passed, results[0].reasons
    assert results[1].reasons[0].startswith("chat_structure: turn 0: role 'assistant'")
    assert "final assistant turn is empty" in results[2].reasons[0]
    assert "unbalanced code fences" in results[3].reasons[0]
    assert "does not parse as a JSON call" in results[4].reasons[0] and "{city: Paris" in results[4].reasons[0]
    assert "'send_email' matches no declared tool" in results[5].reasons[0]
    assert results[6].reasons == ["chat_structure: tool call 'rm_rf' matches no declared tool"]
    assert results[7].reasons == ["chat_structure: tool call 'get_weather' but the row declares no tools"]
    assert role_order_problem([{"role": "user"}, {"role": "tool"}]) == "turn 1: role 'tool' after 'user'"


def test_forbidden_patterns():
    rows = [{"prompt": "q", "completion": "As an AI language model, I cannot."}, {"prompt": "q", "completion": "4"}]
    (hit,), (clean,) = check([{"name": "forbidden_patterns", "patterns": [r"as an ai language model"]}], rows)
    assert not hit.passed and hit.scores["forbidden_patterns.matches"] == 1 and clean.passed


def test_verify_answer_keeps_correct_gsm8k_answers_only(shared_data):
    rows = []
    with open(shared_data / "gsm8k" / "train.jsonl") as fh:
        for _, line in zip(range(40), fh):
            r = json.loads(line)
            rows.append(chat({"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]},
                             answer=r["answer"]))
    wrong = json.loads(json.dumps(rows[:10]))
    for r in wrong:  # a wrong final number
        text = r["messages"][1]["content"]
        head, final = text.rsplit("#### ", 1)
        r["messages"][1]["content"] = f"{head}#### {int(final.replace(',', '')) + 1}"
    results = check([{"name": "verify_answer", "reward": "math"}], rows + wrong)
    assert all(r[0].passed for r in results[:40])
    assert not any(r[0].passed for r in results[40:])
    assert results[40][0].reasons == ["verify_answer: reward math = 0 < 1"]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"rules\[1\]\.name: unknown filter 'lenght'"):
        config_from_dict({"rules": [{"name": "length"}, {"name": "lenght"}]})
    with pytest.raises(ConfigError, match=r"config: unknown field rules\[0\]\.max_char \(known in rules\[0\]: max_chars, "):
        config_from_dict({"rules": [{"name": "length", "max_char": 3}]})
    with pytest.raises(ConfigError, match=r"dedup\.near\.threshold must be a number, got 'high'"):
        config_from_dict({"dedup": {"near": {"threshold": "high"}}})
    with pytest.raises(ConfigError, match=r"judge\.on_unparseable must be one of \['keep', 'drop', 'retry'\], got 'ignore'"):
        config_from_dict({"judge": {"on_unparseable": "ignore"}})
    with pytest.raises(ConfigError, match=r"unknown field judges \(known in the config: dedup, judge, rules\)"):
        config_from_dict({"judges": {}})
    with pytest.raises(ConfigError, match=r"judge\.backend\.model: required"):
        config_from_dict({"judge": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"rules\.forbidden_patterns\.patterns\[0\]: invalid regex"):
        config_from_dict({"rules": [{"name": "forbidden_patterns", "patterns": ["(unclosed"]}]})
    path = tmp_path / "f.yaml"
    path.write_text("rules:\n  - name: length\n    max_chars: 10\n")
    config = load_config(path, ["rules.length.max_chars=99", "judge.min_score=8"])
    assert config.rules[0].options.max_chars == 99 and config.judge.min_score == 8.0
    with pytest.raises(ConfigError, match=rf"{path}: rules\[0\]\.max_chars must be an integer, got 'lots'"):
        load_config(path, ["rules.0.max_chars=lots"])


def test_shipped_recipes_load():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "recipes" / "filter"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert names == ["math_verified.yaml", "pairwise_preferences.yaml", "sft_chat.yaml"]
    for path in root.glob("*.yaml"):
        config = load_config(path)
        build_rules(config.rules)


def test_filter_overrides_take_both_forms_and_address_rules_and_typed_keys(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("rules:\n  - name: length\n    id: short-answers\n    max_chars: 10\n  - name: repetition\n"
                    "judge:\n")
    config = load_config(path, ["--rules.short-answers.min_chars", "2", "--judge.min_score=8",
                                "rules.repetition.max_top_ngram_char_fraction.2=0.5", "dedup.near.ngram=5"])
    assert config.rules[0].id == "short-answers" and config.rules[0].options.min_chars == 2
    assert config.rules[0].options.max_chars == 10
    # a mapping given replaces the default one; its keys take the declared type (int), its values theirs (float)
    assert config.rules[1].options.max_top_ngram_char_fraction == {2: 0.5}
    assert config.judge.min_score == 8.0 and config.judge.backend.concurrency == 8  # `judge:` left empty: defaults
    assert config.dedup.near.ngram == 5
    assert config.to_dict()["rules"][0] == {"name": "length", "id": "short-answers", "target": "completion",
                                            "min_chars": 2, "max_chars": 10, "min_tokens": None, "max_tokens": None,
                                            "tokenizer": None}
    with pytest.raises(ConfigError, match=r"override rules\.long\.max_chars: no list item 'long'"):
        load_config(path, ["rules.long.max_chars=1"])
    with pytest.raises(ConfigError, match=rf"{path}: rules\[1\]\.max_top_ngram_char_fraction key 'x' must be an int"):
        load_config(path, ["rules.repetition.max_top_ngram_char_fraction.x=0.5"])
