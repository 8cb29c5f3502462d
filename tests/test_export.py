"""``posttrain export`` / ``posttrain verify``: LoRA merged, HF folder that transformers' GraniteMoeHybrid loads with
the same logits, the same chat rendering, a sha256 manifest with provenance, an Ed25519 signature, and verify naming
the file that differs."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.cli import main as cli
from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer
from posttrain.verify import verify_checkpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny hybrid with a trained-looking LoRA adapter, exported and signed through the CLI."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("export")
    tok = build_tokenizer(arithmetic_corpus(200), vocab_size=300)
    torch.manual_seed(0)
    base = HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, bos_token_id=None))
    base.save_pretrained(root / "base")
    tok.save_pretrained(str(root / "base"))
    (root / "base" / "training_manifest.json").write_text(json.dumps({"recipe": "recipes/sft_tiny.yaml",
                                                                      "data": [{"sha256": "ab" * 32}]}))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=["in_proj", "out_proj", "q_proj", "v_proj"]))
    peft_model.save_pretrained(str(root / "adapter"))
    merged = peft_model.merge_and_unload()
    key = root / "signing.pem"
    rc = cli(["export", "--model", str(root / "base"), "--adapter", str(root / "adapter"), "--out",
              str(root / "out"), "--key", str(key), "--generate-key"])
    assert rc == 0
    return root, tok, merged


def test_export_loads_in_transformers_with_the_same_logits(exported):
    from transformers import AutoTokenizer, GraniteMoeHybridForCausalLM

    root, tok, merged = exported
    out = root / "out"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "manifest.json", "manifest.sig", "signing_key.pub"):
        assert (out / name).is_file(), name
    theirs = GraniteMoeHybridForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = HybridForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok("Ada has 12 apples and gets 7 more. How many?")["input_ids"]])
    with torch.no_grad():
        want = merged.eval()(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(ids).logits, want, atol=1e-5, rtol=1e-5)
    messages = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert loaded.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_manifest_lists_every_file_with_provenance(exported):
    from posttrain.provenance import file_digest

    root, _, _ = exported
    out = root / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    files = {p.name for p in out.iterdir()} - {"manifest.json", "manifest.sig", "signing_key.pub"}
    assert set(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == file_digest(out / name)
    prov = manifest["provenance"]
    assert prov["training"]["recipe"] == "recipes/sft_tiny.yaml"
    assert len(prov["source"]["sha256"]) == 64 and "adapter_model.safetensors" in prov["adapter"]["sha256"]


def test_verify_passes_and_names_the_file_that_differs(exported, tmp_path):
    import shutil

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    root, _, _ = exported
    assert verify_checkpoint(root / "out") == []
    assert cli(["verify", str(root / "out")]) == 3  # intact, but no trusted key: the publisher is not verified
    assert cli(["verify", str(root / "out"), "--allow-untrusted"]) == 0

    copy = tmp_path / "copy"
    shutil.copytree(root / "out", copy)
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-5] ^= 0x01  # one bit in one weight
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert verify_checkpoint(copy) == ["model.safetensors: contents differ from the signed manifest (sha256 mismatch)"]
    assert cli(["verify", str(copy)]) == 1

    shutil.rmtree(copy)
    shutil.copytree(root / "out", copy)
    (copy / "extra.py").write_text("print('hi')\n")
    (copy / "tokenizer.json").unlink()
    problems = verify_checkpoint(copy)
    assert "tokenizer.json: missing" in problems and "extra.py: not listed in the signed manifest" in problems

    shutil.rmtree(copy)
    shutil.copytree(root / "out", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["provenance"]["training"]["recipe"] = "something else"
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    assert any(p.startswith("manifest.json: the signature") for p in verify_checkpoint(copy))

    other = tmp_path / "other.pub"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert any("signature" in p for p in verify_checkpoint(root / "out", public_key=other))
    assert verify_checkpoint(root / "out", public_key=root / "out" / "signing_key.pub") == []


def test_export_refuses_to_overwrite_a_key_and_needs_a_chat_template(exported, tmp_path):
    root, _, _ = exported
    assert cli(["export", "--model", str(root / "base"), "--out", str(tmp_path / "o"), "--key",
                str(root / "signing.pem"), "--generate-key"]) == 2
    plain = tmp_path / "plain"
    import shutil

    shutil.copytree(root / "base", plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    assert cli(["export", "--model", str(plain), "--out", str(tmp_path / "o"), "--key", str(root / "signing.pem")]) == 2
    assert not (tmp_path / "o").exists()
