"""One DPO run from a recipe: tokenizer, preference data, model (+ LoRA), ``DpoTrainer``, the final checkpoint.

The data are read and checked before any model is loaded. The model, tokenizer, LoRA set-up and the final folder
(with held-out metrics in its ``training_manifest.json``) are SFT's (``posttrain.train.run``). This module never
signs or exports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.config import config_to_dict
from posttrain.dpo.config import DpoConfig
from posttrain.dpo.data import load_pairs
from posttrain.dpo.trainer import DpoResult, DpoTrainer
from posttrain.provenance import data_provenance
from posttrain.train.run import apply_lora, load_model, load_tokenizer, save_final, start_run


def run_dpo(config: DpoConfig, recipe: str | None = None,
            on_step: Callable[[int, dict[str, Any]], None] | None = None) -> DpoResult:
    """Train from ``config``; ``on_step(step, metrics)`` is called after every optimizer step."""
    d = config.data
    tokenizer = load_tokenizer(config)  # type: ignore[arg-type]
    fields = {"prompt_field": d.prompt_field, "chosen_field": d.chosen_field, "rejected_field": d.rejected_field}
    train = load_pairs(d.train_files, tokenizer, max_length=d.max_length, max_rows=d.max_samples, **fields)
    held_out = load_pairs(d.eval_files, tokenizer, max_length=d.max_length, **fields) if d.eval_files else []
    model, base = load_model(config, tokenizer)  # type: ignore[arg-type]
    if config.lora.enabled:
        import torch

        torch.manual_seed(config.run.seed)  # the adapter's initialisation is a function of the recipe
        model = apply_lora(model, config.lora, fused_head=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reference = (f"{base.get('sha256', base)}" + (" adapter disabled" if config.lora.enabled else ""))
    trainer = DpoTrainer(config, model, train, held_out, pad_token_id=pad, run_config=config_to_dict(config),
                         reference_id=reference, on_step=on_step)
    start_run(trainer, config, f"dpo ({config.loss.type}): {len(train)} pairs, {len(held_out)} held out")
    result = trainer.train()
    save_final(trainer, config, tokenizer, "dpo", recipe, base, result,
               eval_data=[data_provenance(p) for p in d.eval_files], eval=result.eval_metrics, pairs=len(train))
    return result
