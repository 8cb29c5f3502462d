"""``posttrain verify`` says who signed: integrity alone is not a verified publisher.

The folders here are signed by ``posttrain.export``'s own signing step over a small safetensors file; an attacker
replaces the weights and re-signs with a key of their own, as anyone can. Fingerprints are computed here from the
definition (SHA-256 of the raw 32-byte Ed25519 public key), not through the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file

from posttrain.cli import main as cli
from posttrain.export import write_manifest_and_sign


def public_pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(private_key) -> str:
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    return hashlib.sha256(raw).hexdigest()


def make_export(folder, private_key, seed: int):
    folder.mkdir(parents=True)
    save_file({"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(seed))}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "granitemoehybrid"}))
    write_manifest_and_sign(folder, private_key, {"source": {"seed": seed}})
    return folder


@pytest.fixture
def world(tmp_path):
    publisher, attacker = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "publisher.pub").write_bytes(public_pem(publisher))
    (tmp_path / "attacker.pub").write_bytes(public_pem(attacker))
    genuine = make_export(tmp_path / "genuine", publisher, seed=0)
    # the attacker's copy: the publisher's folder with the weights replaced, then re-signed with the attacker's key
    resigned = tmp_path / "resigned"
    shutil.copytree(genuine, resigned)
    save_file({"w": torch.zeros(4, 4)}, str(resigned / "model.safetensors"))
    write_manifest_and_sign(resigned, attacker, json.loads((genuine / "manifest.json").read_text())["provenance"])
    return tmp_path, publisher, attacker


def test_without_a_trusted_key_integrity_is_checked_the_signer_named_and_the_exit_code_is_3(world, capsys,
                                                                                               monkeypatch):
    root, publisher, _ = world
    monkeypatch.delenv("POSTTRAIN_TRUSTED_KEYS", raising=False)
    assert cli(["verify", str(root / "genuine")]) == 3
    out = capsys.readouterr().out
    assert "signature valid, 2 files match the manifest (integrity verified)" in out
    assert f"signing key: {fingerprint(publisher)}" in out
    assert "PUBLISHER NOT VERIFIED" in out
    assert cli(["verify", str(root / "genuine"), "--allow-untrusted"]) == 0
    assert "PUBLISHER NOT VERIFIED" in capsys.readouterr().out  # allowed, still said plainly


def test_the_publishers_key_verifies_the_publisher(world, capsys):
    root, publisher, _ = world
    assert cli(["verify", str(root / "genuine"), "--public-key", str(root / "publisher.pub")]) == 0
    out = capsys.readouterr().out
    assert f"OK publisher verified: {fingerprint(publisher)}" in out and "NOT VERIFIED" not in out


def test_a_model_replaced_and_resigned_with_another_key_fails_with_3_naming_both_keys(world, capsys, monkeypatch):
    root, publisher, attacker = world
    monkeypatch.delenv("POSTTRAIN_TRUSTED_KEYS", raising=False)
    resigned = str(root / "resigned")
    # the folder is intact under the attacker's key: integrity alone cannot tell
    assert cli(["verify", resigned, "--allow-untrusted"]) == 0
    assert f"signing key: {fingerprint(attacker)}" in capsys.readouterr().out

    assert cli(["verify", resigned, "--public-key", str(root / "publisher.pub")]) == 3
    out = capsys.readouterr().out
    failure = next(line for line in out.splitlines() if line.startswith("FAIL publisher"))
    assert fingerprint(attacker) in failure and fingerprint(publisher) in failure
    # --allow-untrusted never accepts a signer outside the keys the user trusts
    assert cli(["verify", resigned, "--public-key", str(root / "publisher.pub"), "--allow-untrusted"]) == 3


def test_trusted_keys_file_environment_variable_and_repeated_public_keys(world, capsys, monkeypatch):
    root, publisher, attacker = world
    other = Ed25519PrivateKey.generate()
    ring = root / "trusted.pem"
    ring.write_bytes(b"# keys we trust\n" + public_pem(other) + b"\n" + public_pem(publisher))
    assert cli(["verify", str(root / "genuine"), "--trusted-keys", str(ring)]) == 0
    assert cli(["verify", str(root / "resigned"), "--trusted-keys", str(ring)]) == 3
    capsys.readouterr()

    monkeypatch.setenv("POSTTRAIN_TRUSTED_KEYS", str(ring))
    assert cli(["verify", str(root / "genuine")]) == 0
    assert cli(["verify", str(root / "resigned")]) == 3
    # keys on the command line replace the environment's
    assert cli(["verify", str(root / "resigned"), "--public-key", str(root / "attacker.pub")]) == 0
    assert cli(["verify", str(root / "genuine"), "--public-key", str(root / "attacker.pub"),
                "--public-key", str(root / "publisher.pub")]) == 0
    capsys.readouterr()

    # the same through the installed command, in a process of its own
    run = subprocess.run([sys.executable, "-m", "posttrain.cli", "verify", str(root / "resigned")],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "POSTTRAIN_TRUSTED_KEYS": str(ring)})
    assert run.returncode == 3, run.stdout + run.stderr
    assert fingerprint(attacker) in run.stdout and fingerprint(publisher) in run.stdout


def test_tampered_files_exit_1_even_when_the_signer_is_trusted(world, capsys):
    root, _, _ = world
    copy = root / "tampered"
    shutil.copytree(root / "genuine", copy)
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-3] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(weights))
    for extra in ([], ["--public-key", str(root / "publisher.pub")], ["--allow-untrusted"]):
        assert cli(["verify", str(copy), *extra]) == 1
        assert "FAIL model.safetensors: contents differ from the signed manifest" in capsys.readouterr().out

    # the signature made by the publisher, the embedded key swapped for another: not what was signed
    shutil.rmtree(copy)
    shutil.copytree(root / "genuine", copy)
    shutil.copy(root / "attacker.pub", copy / "signing_key.pub")
    assert cli(["verify", str(copy), "--public-key", str(root / "publisher.pub")]) == 1
    assert "FAIL signing_key.pub: not the key that signed the manifest" in capsys.readouterr().out
    # and without a trusted key the signature matches no key at all
    assert cli(["verify", str(copy)]) == 1
    assert "does not match it under the embedded key" in capsys.readouterr().out


def test_bad_input_exits_2_and_says_what(world, capsys, tmp_path):
    root, publisher, _ = world
    assert cli(["verify", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert cli(["verify", str(tmp_path / "plain")]) == 2
    assert "not a signed export" in capsys.readouterr().err

    assert cli(["verify", str(root / "genuine"), "--public-key", str(tmp_path / "missing.pub")]) == 2
    assert "missing.pub: cannot read the key file" in capsys.readouterr().err
    private = tmp_path / "private.pem"
    private.write_bytes(publisher.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    assert cli(["verify", str(root / "genuine"), "--public-key", str(private)]) == 2
    assert "PEM block 1 is a 'PRIVATE KEY', not a PUBLIC KEY" in capsys.readouterr().err
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    assert cli(["verify", str(root / "genuine"), "--trusted-keys", str(junk)]) == 2
    assert "junk.pem: no PEM public key in it" in capsys.readouterr().err
