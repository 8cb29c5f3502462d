"""The DPO loop: preference pairs -> sequence log-probabilities -> preference loss, on ``PlanTrainer``
(``posttrain.train.loop``: the chassis, SFT's ``BatchPlan``, resuming). What is DPO's own: each process collates its
micro-batches of pairs (one padding-free row, or padded rows); the policy's summed completion log-probabilities come
from the fused chunked kernel (full logits never exist), the reference's from the precomputed ``ReferenceTable``, a
frozen copy, or the LoRA model with its adapter disabled (SimPO needs none); the loss is the sum of the per-pair
losses over the global batch / the global pair count, so accumulation and processes give the same step, plus a
mixture of experts' load-balancing loss, as in SFT. This module never reads data files and never writes outside
``checkpoint.output_dir``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.dpo.config import DpoConfig
from posttrain.dpo.data import PreferencePair, collate_pairs
from posttrain.dpo.loss import PairLogps, preference_loss
from posttrain.families import core_model, router_loss_on
from posttrain.provenance import stream_digest
from posttrain.train.loop import PlanTrainer, TrainResult

REFERENCE_FILE = "reference_logps.jsonl"
_STATS = ("loss", "chosen_reward", "rejected_reward", "correct", "chosen_logps", "rejected_logps")


def sequence_logps(model, batch: dict[str, Any], device, router_aux: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed log-probability of each sequence's completion tokens, shape (n_seqs,); the MoE load-balancing loss
    when ``router_aux`` and the model has experts, else None), through ``model``'s forward.

    The in-tree hybrid returns its final hidden states and the fused chunked kernel scores the targets; any other
    causal LM goes through its logits."""
    core = core_model(model)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    index, targets = batch["target_index"].to(device), batch["targets"].to(device)
    if type(core).__name__ == "HybridForCausalLM":
        out = model(**inputs, return_logits=False, output_router_logits=router_aux)
        hidden = out.hidden_states.reshape(-1, out.hidden_states.shape[-1])[index]
        lp = core.token_logprobs(hidden, targets)
        aux = out.aux_loss if router_aux else None
    else:  # no cache: packed rows are masked by their position_ids
        out = model(**inputs, use_cache=False, **({"output_router_logits": True} if router_aux else {}))
        aux, logits = out.aux_loss if router_aux else None, out.logits
        lp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[index].float(), dim=-1)
        lp = lp.gather(1, targets[:, None])[:, 0]
    sums = torch.zeros(batch["n_seqs"], dtype=lp.dtype, device=device)
    return sums.index_add(0, batch["target_seq"].to(device), lp), aux


def pair_logps(seq: torch.Tensor, lengths: torch.Tensor) -> PairLogps:
    lengths = lengths.to(seq)
    return PairLogps(seq[0::2], seq[1::2], lengths[0::2], lengths[1::2])


# -- the reference's log-probabilities, computed once ---------------------------------------------------------------
class ReferenceTable:
    """Reference log-probs of every pair (train and eval), computed before training and stored as JSON lines.

    The file starts with a header naming what it was computed from (data fingerprint, reference identity); the
    rows follow in chunks, appended as they are computed, so a run killed during the precomputation continues
    where it stopped. A header that does not match the run means the file is recomputed from scratch.
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path = path
        self.fingerprint = fingerprint
        self.values: dict[tuple[str, int], tuple[float, float]] = {}

    @staticmethod
    def fingerprint_of(splits: dict[str, Sequence[PreferencePair]], reference: str, chunk: int,
                       precision: str = "no") -> dict[str, Any]:
        digest = stream_digest(json.dumps([name, p.prompt_ids, p.chosen_ids, p.rejected_ids])
                               for name, pairs in splits.items() for p in pairs)
        return {"kind": "header", "pairs_sha256": digest, "reference": reference, "chunk": chunk,
                "mixed_precision": precision}

    def _read(self) -> None:
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if header != self.fingerprint:
            return
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by a kill: recompute from there
            self.values[(row["split"], row["index"])] = (row["chosen"], row["rejected"])

    def compute(self, acc, score: Callable[[list[PreferencePair]], PairLogps],
                splits: dict[str, Sequence[PreferencePair]], chunk: int) -> None:
        """Fill the table in fixed chunks of ``chunk`` pairs of a split (the same chunks whatever the process count or an
        interruption, so the values are too): round k gives chunk k * W + r to process r; the main process appends
        every finished round to the file."""
        self._read()
        chunks = [[(name, i) for i in range(k, min(k + chunk, len(pairs)))]
                  for name, pairs in splits.items() for k in range(0, len(pairs), chunk)]
        todo = [c for c in chunks if any(key not in self.values for key in c)]
        for c in todo:  # a chunk cut short is recomputed whole
            for key in c:
                self.values.pop(key, None)
        if acc.is_main_process:  # rewrite what is kept (drops a cut last line, a partial chunk, a stale file)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                f.write(json.dumps(self.fingerprint) + "\n")
                f.writelines(json.dumps({"split": split, "index": i, "chosen": c, "rejected": r}) + "\n"
                             for (split, i), (c, r) in self.values.items())
            os.replace(tmp, self.path)
        acc.wait_for_everyone()
        W = acc.num_processes
        for start in range(0, len(todo), W):
            mine = todo[start:start + W][acc.process_index] if start + acc.process_index < len(todo) else []
            rows = []
            if mine:
                with torch.no_grad():
                    logps = score([splits[name][i] for name, i in mine])
                rows = [{"split": name, "index": i, "chosen": float(c), "rejected": float(r)}
                        for (name, i), c, r in zip(mine, logps.chosen.tolist(), logps.rejected.tolist())]
            if W > 1:
                from accelerate.utils import gather_object

                rows = gather_object(rows)
            for row in rows:
                self.values[(row["split"], row["index"])] = (row["chosen"], row["rejected"])
            if acc.is_main_process:
                with open(self.path, "a") as f:
                    f.write("".join(json.dumps(row) + "\n" for row in rows))
                    f.flush()
                    os.fsync(f.fileno())
        acc.wait_for_everyone()

    def lookup(self, split: str, indices: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        vals = torch.tensor([self.values[(split, i)] for i in indices], dtype=torch.float64, device=device)
        return vals[:, 0], vals[:, 1]


@dataclass
class DpoResult(TrainResult):
    eval_metrics: dict[str, float] = field(default_factory=dict)


class DpoTrainer(PlanTrainer):
    """Trains ``model`` on ``train_pairs`` (and reports on ``eval_pairs``) with the configured preference loss; the
    reference is the model as given, or for a peft model the model with its adapter disabled."""

    unit = "pairs"

    def __init__(self, config: DpoConfig, model, train_pairs: Sequence[PreferencePair],
                 eval_pairs: Sequence[PreferencePair] = (), *, pad_token_id: int = 0,
                 run_config: dict[str, Any] | None = None, reference_id: str = "initial weights",
                 on_step: Callable[[int, dict[str, Any]], None] | None = None):
        self.train_pairs = list(train_pairs)
        self.eval_pairs = list(eval_pairs)
        super().__init__(config, len(self.train_pairs), stage="dpo", run_config=run_config, on_step=on_step)
        acc = self.accelerator
        self.pad_token_id = pad_token_id
        self.packed = config.data.packing
        self.lora = hasattr(model, "disable_adapter")
        core = core_model(model)
        self.moe_aux = router_loss_on(core, config.model.moe_aux_loss)
        model = model.to(acc.device)
        if self.packed:  # a transformers model packs through its own masks: checked on one row before any work
            from posttrain.families import check_packed_rows

            check_packed_rows(model)
        self.ref_model = None
        self.table: ReferenceTable | None = None
        loss = config.loss
        if loss.needs_reference and loss.reference == "precomputed":
            splits = {"train": self.train_pairs, "eval": self.eval_pairs}
            self.table = ReferenceTable(self.chassis.output_dir / REFERENCE_FILE,
                                        ReferenceTable.fingerprint_of(splits, reference_id, config.eval.batch_size,
                                                                      str(acc.mixed_precision)))
            model.eval()
            with acc.autocast():  # the precision the policy is scored in (bf16 autocast on GPU), or the
                # rewards start off zero by the rounding between the two
                self.table.compute(acc, lambda pairs: self._reference_logps(model, pairs), splits,
                                   config.eval.batch_size)
        elif loss.needs_reference and not self.lora:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self._prepare(model)

    # -- log-probabilities --------------------------------------------------------------------------------------
    def _logps(self, model, pairs: Sequence[PreferencePair], router_aux: bool = False
               ) -> tuple[PairLogps, torch.Tensor | None]:
        batch = collate_pairs(pairs, self.packed, self.pad_token_id)
        seq, aux = sequence_logps(model, batch, self.accelerator.device, router_aux)
        return pair_logps(seq, batch["lengths"]), aux

    @torch.no_grad()
    def _reference_logps(self, model, pairs: Sequence[PreferencePair]) -> PairLogps:
        unwrapped = model
        while hasattr(unwrapped, "module"):
            unwrapped = unwrapped.module
        with unwrapped.disable_adapter() if self.lora else contextlib.nullcontext():
            return self._logps(model, pairs)[0]

    def _reference(self, split: str, indices: Sequence[int], pairs: Sequence[PreferencePair],
                   policy: PairLogps) -> PairLogps | None:
        if not self.config.loss.needs_reference:
            return None
        if self.table is not None:
            chosen, rejected = self.table.lookup(split, indices, policy.chosen.device)
            return PairLogps(chosen.to(policy.chosen.dtype), rejected.to(policy.chosen.dtype), policy.chosen_tokens,
                             policy.rejected_tokens)
        return self._reference_logps(self.ref_model if self.ref_model is not None else self.model, pairs)

    def _pair_stats(self, split: str, indices: Sequence[int], pairs: Sequence[PreferencePair]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(per-pair losses, a (6,) float64 tensor of summed statistics in the order of ``_STATS``, the MoE
        load-balancing loss when training a model with experts)."""
        policy, aux = self._logps(self.model, pairs, router_aux=self.moe_aux and split == "train")
        reference = self._reference(split, indices, pairs, policy)
        losses, chosen_r, rejected_r = preference_loss(self.config.loss, policy, reference)
        stats = torch.stack([losses.detach().sum(), chosen_r.sum(), rejected_r.sum(),
                             (chosen_r > rejected_r).sum(), policy.chosen.detach().sum(),
                             policy.rejected.detach().sum()]).double()
        return losses, stats, aux

    @staticmethod
    def _named(prefix: str, stats: torch.Tensor, n: int) -> dict[str, float]:
        mean = dict(zip(_STATS, (stats / n).tolist()))
        return {f"{prefix}loss": mean["loss"], f"{prefix}rewards/accuracy": mean["correct"],
                f"{prefix}rewards/chosen": mean["chosen_reward"], f"{prefix}rewards/rejected": mean["rejected_reward"],
                f"{prefix}rewards/margin": mean["chosen_reward"] - mean["rejected_reward"],
                f"{prefix}logps/chosen": mean["chosen_logps"], f"{prefix}logps/rejected": mean["rejected_logps"],
                f"{prefix}logps/margin": mean["chosen_logps"] - mean["rejected_logps"]}

    # -- one optimizer step -------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        acc = self.accelerator
        self.model.train()
        n_global = self.plan.global_batch
        scale = acc.num_processes / n_global
        totals = torch.zeros(len(_STATS), dtype=torch.float64, device=acc.device)
        aux_total = torch.zeros((), dtype=torch.float64, device=acc.device)
        tokens = 0
        for m in range(self.plan.accum):
            indices = self.plan.micro_indices(step, acc.process_index, m)
            pairs = [self.train_pairs[i] for i in indices]
            with self._micro(m):
                with acc.autocast():
                    losses, stats, aux = self._pair_stats("train", indices, pairs)
                self._backward(losses.sum().float() * scale, aux)
            if aux is not None:
                aux_total += aux.detach().double()
            totals += stats
            tokens += sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        totals = torch.cat([totals, aux_total[None], torch.tensor([float(tokens)], dtype=torch.float64,
                                                                   device=acc.device)])
        if acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        named = self._named("", totals[:-2], n_global)
        return self._close_step(step, named.pop("loss"), float(totals[-2]), {**named, "tokens": int(totals[-1])})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out preference metrics (``eval/...``), each process scoring its share of the pairs."""
        if not self.eval_pairs:
            return {}
        acc = self.accelerator
        self.model.eval()
        size, n = self.config.eval.batch_size, len(self.eval_pairs)
        # the reference table's chunks, chunk k on process k % W: the same batches whatever the process count
        chunks = [list(range(k, min(k + size, n))) for k in range(0, n, size)][acc.process_index::acc.num_processes]
        totals = torch.zeros(len(_STATS), dtype=torch.float64, device=acc.device)
        for idx in chunks:
            with acc.autocast():  # as in training: a frozen on-the-fly reference is not wrapped by prepare
                totals += self._pair_stats("eval", idx, [self.eval_pairs[i] for i in idx])[1]
        if acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        self.model.train()
        return self._named("eval/", totals, len(self.eval_pairs))

    # -- the run ------------------------------------------------------------------------------------------------
    def train(self) -> DpoResult:
        start = self.resume()
        eval_every = self.config.eval.every_steps
        state: dict[str, Any] = {"eval": {}, "t": time.perf_counter()}

        def step(i: int) -> dict[str, Any]:
            metrics = self.train_step(i)
            done = i + 1
            if self.eval_pairs and ((eval_every and done % eval_every == 0) or done == self.total_steps):
                state["eval"] = self.evaluate()
                metrics.update(state["eval"])
            return metrics

        def before_log(done: int, metrics: dict[str, Any]) -> None:
            now = time.perf_counter()
            metrics["step_time_s"] = (now - state["t"]) / self.config.logging.every_steps
            state["t"] = now

        last = self._run(start, step, before_log, lambda i: [self.train_pairs[i].pair_id],
                         figures=lambda metrics: {"loss": f"{metrics['loss']:.4f}"},
                         at_start=self.evaluate if start == 0 and self.eval_pairs else None)
        return DpoResult(self.total_steps, last.get("loss", float("nan")), self.chassis.metrics.path,
                         self.accelerator.unwrap_model(self.model), state["eval"])
