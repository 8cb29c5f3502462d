"""Preference pairs from a real judge server on 127.0.0.1 (the scripted OpenAI-compatible one), judged in both
orders: a clear verdict makes a pair, a judge that always prefers the first position makes none; ``posttrain
pairs`` samples answers from a tiny hybrid with the native engine and writes the rows, their provenance and a
manifest; bad input stops it with an error naming file, line and field."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from posttrain.judges.config import config_from_dict
from posttrain.judges.judge import Judge
from posttrain.judges.rubrics import load_rubric, render
from posttrain.judges.scripted_server import ScriptedJudgeServer, prompt_key

from posttrain.cli import main
from posttrain.dpo.config import PairSamplingSettings, PairsConfig, PairVerdictSettings
from posttrain.dpo.pairs import pairs_from_judge, pairs_on_policy, run_pairs
from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer


@pytest.fixture
def server():
    with ScriptedJudgeServer() as s:
        yield s


def judge_section(server) -> dict:
    return {"backend": {"type": "openai", "base_url": server.base_url, "model": "scripted", "api_key_env": None,
                        "concurrency": 4, "max_retries": 1, "backoff_s": 0.01, "timeout_s": 5.0}}


def make_judge(server, tmp_path) -> Judge:
    cfg = config_from_dict({"judge": {**judge_section(server), "enabled": True, "mode": "pairwise",
                                      "rubric": "pairwise"}}).judge
    return Judge(cfg, tmp_path / "cache.sqlite")


def test_pairs_need_the_same_verdict_in_both_orders(server, tmp_path):
    prompts = ["What is 2 + 2?", "Name a colour."]
    answers = [["4", "2 + 2 = 4, so the answer is 4.", "4 "], ["red", "tan"]]
    judge = make_judge(server, tmp_path)
    rows = pairs_from_judge(judge, prompts, answers, provenance={"generator": "test"})
    # the scripted judge prefers the longer answer and calls equal lengths a tie: prompt 0 has two distinct answers
    # ("4 " repeats "4"), prompt 1 two of equal length (a tie: no pair)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("2 + 2 = 4, so the answer is 4.", "4")]
    prov = rows[0]["provenance"]
    assert prov["verdicts"] == ["B", "A"] and prov["chosen_sample"] == 1 and prov["rejected_sample"] == 0
    assert prov["judge_model"] == "scripted" and prov["generator"] == "test"
    _, rubric = load_rubric("pairwise")
    for a, b in (("4", "2 + 2 = 4, so the answer is 4."), ("2 + 2 = 4, so the answer is 4.", "4")):
        assert server.requests[prompt_key(render(rubric, prompt=prompts[0], response_a=a, response_b=b))] == 1
    assert sum(server.requests.values()) == 4  # two pairs (one per prompt), each judged in both orders
    judge.close()

    server.always_first = True  # a position-biased judge: each order picks a different answer, so no pair
    biased = Judge(make_judge(server, tmp_path).config, tmp_path / "cache2.sqlite")
    assert pairs_from_judge(biased, prompts, answers) == []
    biased.close()


def test_posttrain_pairs_samples_judges_and_writes_rows_with_provenance(server, tmp_path):
    tok = build_tokenizer(arithmetic_corpus(200), vocab_size=300)
    torch.manual_seed(0)
    HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, bos_token_id=None)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(str(tmp_path / "m"))
    prompts = [{"prompt": f"Question: Ada has {a} coins and gets 2 more. How many?\nAnswer:", "answer": str(a + 2)}
               for a in (3, 10, 21)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    config = PairsConfig(prompts_file=str(tmp_path / "prompts.jsonl"), output=str(tmp_path / "out" / "pairs.jsonl"),
                         sampling=PairSamplingSettings(model=str(tmp_path / "m"), num_samples=3, max_new_tokens=12),
                         verdict=PairVerdictSettings(source="judge", judge=judge_section(server), max_pairs_per_prompt=3))
    report = run_pairs(config)
    rows = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert report.answers == 9 and report.pairs == len(rows) > 0
    for row in rows:
        assert row["prompt"] in [p["prompt"] for p in prompts]
        assert len(row["chosen"]) > len(row["rejected"])  # what the scripted judge prefers, in both orders
        assert row["provenance"]["verdicts"] in (["A", "B"], ["B", "A"])
        assert row["provenance"]["sampling_seed"] == 0 and len(row["provenance"]["generator_sha256"]) == 64
    manifest = json.loads((tmp_path / "out" / "pairs.jsonl.manifest.json").read_text())
    assert manifest["pairs"] == len(rows) and manifest["answers"] == 9
    assert sum(server.requests.values()) % 2 == 0 and sum(server.requests.values()) >= 2 * len(rows)
    assert not list((tmp_path / "out").glob("*.tmp"))

    # the same prompts through the reward path: a random model's answers are refuted, so no pair and no crash
    code = main(["pairs", "--prompts_file", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "r.jsonl"),
                 "--sampling.model", str(tmp_path / "m"), "--sampling.num_samples", "2", "--sampling.max_new_tokens",
                 "4", "--verdict.source", "reward"])
    assert code == 0
    manifest = json.loads((tmp_path / "r.jsonl.manifest.json").read_text())
    assert manifest["answers"] == 6 and manifest["pairs"] == (tmp_path / "r.jsonl").read_text().count("\n")


def test_posttrain_pairs_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    code = main(["pairs", "--prompts_file", str(tmp_path / "prompts.jsonl"), "--sampling.model", str(tmp_path)])
    assert code == 2
    assert f"{tmp_path / 'prompts.jsonl'}:2: missing field `prompt`" in capsys.readouterr().err
    code = main(["pairs", "--prompts_file", str(tmp_path / "prompts.jsonl"), "--verdict.source", "oracle"])
    assert code == 2 and "verdict.source must be one of ['judge', 'reward']" in capsys.readouterr().err
    (tmp_path / "ok.jsonl").write_text('{"prompt": "ok"}\n')
    code = main(["pairs", "--prompts_file", str(tmp_path / "ok.jsonl"), "--verdict.judge",
                 "{backend: {type: carrier-pigeon}}"])
    assert code == 2 and "verdict.judge" in capsys.readouterr().err
    code = main(["pairs", "--prompts_file", str(tmp_path / "ok.jsonl"), "--sampling.num_samples", "1"])
    assert code == 2 and "sampling.num_samples must be at least 2" in capsys.readouterr().err


# -- on-policy pairs ---------------------------------------------------------------------------------------------
MATCH_REWARD = '''
def match(prompts, completions, target, want, **kwargs):
    """1.0 when the answer equals `target` (want "equal") or differs from it (want "differ"), else 0.0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float((t.strip() == g.strip()) == (w == "equal")) for t, g, w in zip(texts, target, want)]
'''


def argmax_answer(model, tok, prompt: list[dict], max_new_tokens: int) -> str:
    """Greedy decoding as a plain loop: the whole sequence through the model at every step, the argmax appended."""
    ids = list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
               ["input_ids"])
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(new, skip_special_tokens=True)


def test_on_policy_pairs_reject_the_models_greedy_answer(tmp_path, monkeypatch):
    """A prompt the model gets wrong gives a pair whose rejected answer is the model's own greedy answer (decoded by
    an argmax loop here); the chosen one is a verified sample, or, when no sample is verified, the reference answer
    in the SFT format; a prompt the model gets right gives none."""
    (tmp_path / "match_reward.py").write_text(MATCH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    tok = build_tokenizer(arithmetic_corpus(200), vocab_size=300)
    torch.manual_seed(0)
    model = HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, bos_token_id=None)).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(str(tmp_path / "m"))
    prompts = [[{"role": "user", "content": f"{a}+{b}="}] for a, b in ((12, 3), (40, 7), (25, 5))]
    greedy = [argmax_answer(model, tok, p, 6) for p in prompts]
    assert all(g.strip() for g in greedy)
    rows = [  # right (the target is its greedy answer); wrong, and only the reference is right; wrong, any other
        {"prompt": prompts[0], "target": greedy[0], "want": "equal"},  # answer is right
        {"prompt": prompts[1], "target": "47", "want": "equal"},
        {"prompt": prompts[2], "target": greedy[2], "want": "differ"},
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = PairsConfig(prompts_file=str(tmp_path / "prompts.jsonl"), output=str(tmp_path / "pairs.jsonl"),
                         pairing="on_policy",
                         sampling=PairSamplingSettings(model=str(tmp_path / "m"), num_samples=4, max_new_tokens=6),
                         verdict=PairVerdictSettings(source="reward", reward="match_reward:match",
                                                     reference_answer="{target}", max_pairs_per_prompt=2))
    report = run_pairs(config)
    out = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    by_prompt: dict[int, list[dict]] = {}
    for row in out:
        by_prompt.setdefault(row["provenance"]["prompt_index"], []).append(row)
    assert sorted(by_prompt) == [1, 2]  # the prompt answered right gives no pair
    for p, mine in by_prompt.items():
        for row in mine:
            assert row["prompt"] == prompts[p]
            assert row["rejected"] == [{"role": "assistant", "content": greedy[p]}]
            assert row["provenance"]["rejected_from"] == "greedy" and row["provenance"]["scores"][1] == 0.0
    (ref,) = by_prompt[1]  # a random model's samples are not "47": the reference answer, as written in SFT
    assert ref["chosen"] == [{"role": "assistant", "content": "47"}]
    assert ref["provenance"]["chosen_from"] == "reference" and ref["provenance"]["chosen_sample"] is None
    assert 1 <= len(by_prompt[2]) <= 2
    for row in by_prompt[2]:  # distinct samples that differ from the greedy answer
        assert row["provenance"]["chosen_from"] == "sample" and row["provenance"]["scores"][0] == 1.0
        assert row["chosen"][0]["content"].strip() not in ("", greedy[2].strip())
    assert len({row["chosen"][0]["content"] for row in by_prompt[2]}) == len(by_prompt[2])
    manifest = json.loads((tmp_path / "pairs.jsonl.manifest.json").read_text())
    assert manifest["on_policy"] == report.on_policy == {
        "greedy_refuted": 2, "greedy_verified": 1, "greedy_unscored": 0, "refuted_without_pair": 0,
        "chosen_from_sample": len(by_prompt[2]), "chosen_from_reference": 1, "references_not_verified": 1}
    # (the reference of prompt 2 is its greedy answer, which its reward refutes)

    # without a reference answer, a wrong prompt with no verified sample gives no pair, and says so
    code = main(["pairs", "--prompts_file", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "n.jsonl"),
                 "--pairing", "on_policy", "--sampling.model", str(tmp_path / "m"), "--sampling.num_samples", "4",
                 "--sampling.max_new_tokens", "6", "--verdict.source", "reward", "--verdict.reward",
                 "match_reward:match"])
    assert code == 0
    counts = json.loads((tmp_path / "n.jsonl.manifest.json").read_text())["on_policy"]
    assert counts["refuted_without_pair"] == 1 and counts["chosen_from_reference"] == 0


def test_on_policy_pairing_needs_a_reward_and_a_reference_format_over_known_columns(tmp_path, capsys):
    (tmp_path / "ok.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    code = main(["pairs", "--prompts_file", str(tmp_path / "ok.jsonl"), "--pairing", "on_policy"])
    assert code == 2 and "pairing: on_policy needs verdict.source: reward" in capsys.readouterr().err
    code = main(["pairs", "--prompts_file", str(tmp_path / "ok.jsonl"), "--pairing", "on_policy",
                 "--verdict.source", "reward", "--verdict.reference_answer", "'{solution}'"])  # quoted: YAML
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'ok.jsonl'}:1: verdict.reference_answer '{{solution}}' names column " \
        "`solution`" in err


def test_on_policy_rows_by_hand():
    """Which answer is chosen, by hand: verified distinct samples first (never the greedy text again), the reference
    only when no sample is verified and only if verified itself; no pair for a right, unscorable or (string rows)
    empty greedy answer."""
    prompts = ["p0", "p1", "p2", "p3", "p4", "p5"]
    greedy = ["7", "8", "9", "", "3", "4"]
    greedy_scores = [0.0, 0.0, 1.0, 0.0, None, 0.0]
    answers = [["7", "5", "5 ", "6"], ["8", "1", "2", "3"], ["9"] * 4, ["5"] * 4, ["1"] * 4, ["4", "x", "y", "z"]]
    scores = [[1.0, 1.0, 1.0, 1.0], [0.0] * 4, [1.0] * 4, [1.0] * 4, [0.0] * 4, [0.0] * 4]
    references = ["r0", "r1", "r2", "r3", "r4", "r5"]
    reference_scores = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    rows = pairs_on_policy(prompts, greedy, greedy_scores, answers, scores, references, reference_scores,
                           max_pairs_per_prompt=2)
    got = [(r["prompt"], r["chosen"], r["rejected"], r["provenance"]["chosen_from"], r["provenance"]["chosen_sample"])
           for r in rows]
    # p0: the sample "7" is the greedy answer itself and "5 " repeats "5"
    assert got == [("p0", "5", "7", "sample", 1), ("p0", "6", "7", "sample", 3), ("p1", "r1", "8", "reference", None)]
    assert all(r["provenance"]["scores"][1] == 0.0 for r in rows)
    chat = pairs_on_policy([[{"role": "user", "content": "q"}]], [""], [0.0], [["a", "b"]], [[1.0, 0.0]])
    assert chat[0]["rejected"] == [{"role": "assistant", "content": ""}]  # an empty chat answer is a turn
    assert chat[0]["chosen"] == [{"role": "assistant", "content": "a"}]


def test_pair_answers_keep_the_markup_the_model_wrote(tmp_path):
    """Sampled and greedy answers keep special-token markup (``<tool_call>`` tags), less the closing EOS: a tool call
    decoded without its tags is not a call, so the tool-call reward refutes it and a chosen call would be trained
    without them. The model is built to write one chain of tokens: every block's output projection is zero, so each
    position's logits depend on its own token only, and the output head maps each chain token to the next."""
    from posttrain.dpo.pairs import greedy_answers, sample_answers
    from posttrain.rollout.native import NativeEngine

    tok = build_tokenizer(arithmetic_corpus(200), vocab_size=300)
    torch.manual_seed(0)
    model = HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False))
    prompt = [{"role": "user", "content": "6*7="}]
    last = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][-1]
    chain = [last, *tok.convert_tokens_to_ids(["<tool_call>", "4", "2", "</tool_call>"]), tok.eos_token_id]
    assert len(set(chain)) == len(chain) and tok.unk_token_id not in chain
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "o_proj.weight", "output_linear.weight")):
                p.zero_()
        h = model.model.embed_tokens.weight * model.config.embedding_multiplier
        h = model.model.norm(h)
        model.lm_head.weight.zero_()
        for a, b in itertools.pairwise(chain):
            model.lm_head.weight[b] = 50 * h[a] / h[a].norm() ** 2
    model.eval()
    want = "<tool_call>42</tool_call>"
    engine = NativeEngine(model)
    assert greedy_answers(engine, tok, [prompt], max_new_tokens=8) == [want]
    sampled = sample_answers(engine, tok, [prompt], PairSamplingSettings(model="unused", num_samples=3,
                                                                         temperature=0.5, max_new_tokens=8, seed=0))
    assert sampled == [[want] * 3]


def test_pair_sampling_honours_top_k(tmp_path):
    """``sampling.top_k`` reaches the engine: top-1 sampling at temperature 1 is greedy decoding (the plain argmax
    loop above), while untruncated sampling from the same random model is not."""
    from posttrain.dpo.pairs import sample_answers
    from posttrain.rollout.native import NativeEngine

    tok = build_tokenizer(arithmetic_corpus(200), vocab_size=300)
    torch.manual_seed(0)
    model = HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, bos_token_id=None)).eval()
    prompts = [[{"role": "user", "content": q}] for q in ("6*7=", "12+5=")]
    greedy = [argmax_answer(model, tok, p, max_new_tokens=6) for p in prompts]
    engine = NativeEngine(model)
    top1 = sample_answers(engine, tok, prompts, PairSamplingSettings(model="unused", num_samples=3, top_k=1,
                                                                     max_new_tokens=6, seed=0))
    assert [[t.removesuffix(tok.eos_token) for t in row] for row in top1] == [[g] * 3 for g in greedy]
    free = sample_answers(engine, tok, prompts, PairSamplingSettings(model="unused", num_samples=3,
                                                                     max_new_tokens=6, seed=0))
    assert free != top1


def test_pair_sampling_values_are_checked_when_the_recipe_loads(tmp_path, capsys):
    (tmp_path / "ok.jsonl").write_text('{"prompt": "ok"}\n')
    for field, value, why in (("top_p", "0", "top_p must be in (0, 1], got 0.0"), ("top_k", "-1", "top_k must be >= 0"),
                              ("max_new_tokens", "0", "max_new_tokens must be >= 1")):
        code = main(["pairs", "--prompts_file", str(tmp_path / "ok.jsonl"), f"--sampling.{field}", value])
        err = capsys.readouterr().err
        assert code == 2 and f"sampling: {why}" in err, err
