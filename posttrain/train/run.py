"""One training run from a recipe: tokenizer, data, model (+ LoRA), ``Trainer``, and the final checkpoint.

``run_training(config, task)`` is what ``posttrain sft`` and ``posttrain pretrain`` call; data are read and checked
before any model is loaded. The run's folder gets ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and
``final/``: an HF-format checkpoint (LoRA merged in; the adapter in ``final/adapter``), the tokenizer and
``training_manifest.json`` (``save_final``), which ``posttrain export`` carries into the signed manifest.
``run_stages`` runs a staged context extension. This module never signs or exports.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.config import config_to_dict, config_yaml
from posttrain.merge import merge_checkpoints
from posttrain.models.hybrid.checkpoint import save_state
from posttrain.provenance import (
    TRAINING_MANIFEST,
    checkpoint_provenance,
    data_provenance,
    new_folder,
    versions,
    write_manifest,
)
from posttrain.train.config import LoraSettings, TrainConfig
from posttrain.train.data import load_segments, pack_segments
from posttrain.train.loop import Trainer, TrainingError, TrainResult


def is_hybrid_folder(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"model.path {path}: no config.json there")
    from posttrain.models.hybrid import IN_TREE_MODEL_TYPES  # Granite 4.0-H and dense Granite

    return json.loads(cfg.read_text()).get("model_type") in IN_TREE_MODEL_TYPES


def load_tokenizer(config: TrainConfig):
    """The run's tokenizer; then a ``model.path`` no stage can train is refused, before any data are read."""
    from posttrain.families import check_trainable
    from posttrain.tokenizer import load_tokenizer as load_folder

    source = config.model.tokenizer or config.model.path
    field = "model.tokenizer" if config.model.tokenizer else "model.path"  # the field the user should fix
    if not source or not Path(source).is_dir():
        raise FileNotFoundError(f"{field}: no such folder: {source}" if source else "model.tokenizer: none given")
    try:
        tokenizer = load_folder(source)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{field}: {e}") from None
    if config.model.path is not None:
        check_trainable(config.model.path)
    return tokenizer


def load_model(config: TrainConfig, tokenizer) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model to train and its provenance (preset + seed, or the checkpoint's path and hash)."""
    from posttrain.models.hybrid import HybridForCausalLM, preset

    m = config.model
    if m.preset is not None:
        torch.manual_seed(config.run.seed)
        cfg = preset(m.preset, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        return HybridForCausalLM(cfg), {"preset": m.preset, "seed": config.run.seed}
    if is_hybrid_folder(m.path):
        model = HybridForCausalLM.from_pretrained(m.path, dtype=torch.float32)
    else:
        from posttrain.families import load_causal_lm

        model = load_causal_lm(m.path, dtype=torch.float32)
    return model, checkpoint_provenance(m.path)


def apply_lora(model, lora: LoraSettings, fused_head: bool):
    """``model`` with ``lora``'s adapters (peft). ``fused_head``: the trainer reads the output layer's weight
    directly (the fused log-prob kernel: DPO, GRPO, and the in-tree models everywhere), so an adapter on it would be
    silently ignored, and ``lm_head`` among the targets is refused."""
    from peft import LoraConfig, get_peft_model

    from posttrain.families import default_lora_targets

    targets = list(lora.target_modules) if lora.target_modules else default_lora_targets(model)
    if fused_head and "lm_head" in targets:
        raise TrainingError("lora.target_modules: lm_head cannot be adapted (the fused log-prob kernel reads the "
                            "base output weights)")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise TrainingError(f"lora.target_modules: the {getattr(model.config, 'model_type', '')} model has no module "
                            f"named {', '.join(missing)} (its linear layers: {', '.join(linear)})")
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=targets))


def build_items(config: TrainConfig, tokenizer, task: Literal["sft", "pretrain"]):
    d = config.data
    segments = load_segments(d.train_files, tokenizer, task=task, fmt=d.format, text_field=d.text_field,
                             max_length=d.max_length, truncate=d.truncate, assistant_only=d.assistant_only_loss,
                             completion_only=d.completion_only_loss, max_rows=d.max_samples,
                             prompt_field=d.prompt_field, completion_field=d.completion_field)
    items = pack_segments(segments, d.max_length) if d.packing else [[s] for s in segments]
    return segments, items


def run_training(config: TrainConfig, task: Literal["sft", "pretrain"], recipe: str | None = None) -> TrainResult:
    if config.stages:
        if task != "pretrain":
            raise TrainingError("stages (context extension) are a pre-training recipe; run them with posttrain pretrain")
        return run_stages(config, recipe)
    from posttrain.families import check_packed_rows, is_in_tree

    tokenizer = load_tokenizer(config)
    segments, items = build_items(config, tokenizer, task)
    model, base = load_model(config, tokenizer)
    if config.data.packing:
        check_packed_rows(model)
    if config.lora.enabled:
        model = apply_lora(model, config.lora, fused_head=is_in_tree(model))
    trainer = Trainer(config, model, items, packed=config.data.packing,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                      else tokenizer.eos_token_id, run_config=config_to_dict(config))
    start_run(trainer, config, f"{task}: {len(segments)} sequences in {len(items)} items")
    result = trainer.train()
    save_final(trainer, config, tokenizer, task, recipe, base, result, sequences=len(segments))
    return result


def start_run(trainer, config, what: str) -> None:
    """What every recipe run does before its first step: resume (a checkpoint that cannot be resumed from stops the
    run before anything is written), the run folder with the resolved ``config.yaml``, one line saying what runs."""
    acc = trainer.accelerator
    trainer.resume()
    out = Path(config.checkpoint.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml(config))
    acc.print(f"{what}, global batch {trainer.plan.global_batch}, {trainer.total_steps} steps on "
              f"{acc.num_processes} process(es)")


def save_final(trainer, config, tokenizer, task: str, recipe: str | None, base: dict[str, Any], result,
               data: list[str] | None = None, **extra: Any) -> Path:
    """Write the trained model to ``final/`` atomically, in HF format (LoRA merged; the adapter in ``final/adapter``)
    with its tokenizer and training manifest: the recipe and its resolved config, the starting weights, every data
    file (``data``, default ``data.train_files``) with its digest, the steps and last loss, the versions; ``extra``:
    what the task adds. Returns the folder."""
    acc, model = trainer.accelerator, trainer.model
    files = config.data.train_files if data is None else data
    manifest = {"task": task, "recipe": recipe, "config": config_to_dict(config), "base": base,
                "data": [data_provenance(p) for p in files], "steps": result.steps,
                "final_loss": result.final_loss, "processes": acc.num_processes, "versions": versions(), **extra}
    folder = Path(config.checkpoint.output_dir) / "final"
    state = acc.get_state_dict(model)
    if acc.is_main_process:
        with new_folder(folder) as tmp:
            inner = acc.unwrap_model(model)
            if hasattr(inner, "merge_and_unload"):  # LoRA (lora.enabled, or a peft model given to the trainer)
                inner.save_pretrained(str(tmp / "adapter"))
                inner = inner.merge_and_unload()
                state = inner.state_dict()
            if type(inner).__name__ == "HybridForCausalLM":
                save_state(type(inner), inner.config, state, tmp)
            else:
                inner.save_pretrained(str(tmp), state_dict=state)
            tokenizer.save_pretrained(str(tmp))
            write_manifest(tmp / TRAINING_MANIFEST, manifest)
    acc.wait_for_everyone()
    return folder


def run_stages(config: TrainConfig, recipe: str | None = None) -> TrainResult:
    """Staged context extension: stage i trains at its max_length from the previous stage's merged model, then
    merges (linear or SLERP, weight ``merge_weight`` on the stage's result) with that starting model."""
    from accelerate import PartialState

    out = Path(config.checkpoint.output_dir)
    start: str | None = config.model.path
    tokenizer_dir = config.model.tokenizer or config.model.path
    result: TrainResult | None = None
    for i, stage in enumerate(config.stages, start=1):
        stage_cfg = copy.deepcopy(config)
        stage_cfg.stages = []
        stage_cfg.data = dataclasses.replace(config.data, max_length=stage.max_length)
        stage_cfg.optim = dataclasses.replace(config.optim, max_steps=stage.max_steps,
                                              lr=stage.lr if stage.lr is not None else config.optim.lr)
        stage_cfg.checkpoint = dataclasses.replace(config.checkpoint, output_dir=str(out / f"stage-{i}"))
        if start is not None:
            stage_cfg.model = dataclasses.replace(config.model, path=start, preset=None, tokenizer=tokenizer_dir)
        result = run_training(stage_cfg, "pretrain", recipe)
        trained = out / f"stage-{i}" / "final"
        if start is None:  # the first stage of a run from scratch has no earlier model to merge with
            merged = trained
        else:
            merged = out / f"stage-{i}" / "merged"
            if PartialState().is_main_process:
                merge_checkpoints([start, trained], merged, method=stage.merge_method,
                                  weights=[1.0 - stage.merge_weight, stage.merge_weight])
            PartialState().wait_for_everyone()
        start = str(merged)
    if PartialState().is_main_process:
        with new_folder(out / "final") as tmp:
            shutil.copytree(start, tmp, dirs_exist_ok=True)
    PartialState().wait_for_everyone()
    assert result is not None
    return result
