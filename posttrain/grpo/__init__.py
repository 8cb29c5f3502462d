"""posttrain.grpo: on-policy GRPO with the DAPO loss (and grpo, dr_grpo, gspo) on verifiable rewards.

- ``loss``: the policy losses and group advantages, lines mapped to the formulas.
- ``config``: ``GrpoConfig`` and its groups (rollout, dynamic_sampling, overlong, loss, rewards, optim, eval, ...).
- ``data``: prompt rows, their seeded order, packing into padding-free micro-batches.
- ``collect``: ``RolloutCollector``, a step's groups (engine calls, rewards, dynamic sampling) and ``Rollout`` records.
- ``batch``: ``RolloutBatch``, an update's samples as tensors on the device, and its packed micro-batches.
- ``policy``: loading the policy and its KL reference, scoring a packed row through the fused log-prob kernel.
- ``metrics``: a step's metrics and its ``rollouts.jsonl`` records.
- ``trainer``: ``GrpoTrainer``, the loop on the training chassis (collect -> advantages -> several optimizer steps).
The rollout engines (native, transformers, vLLM, a server), multi-turn and asynchronous rollouts and the weight
sync live in ``posttrain.rollout``; ``server`` here is the HTTP side of ``posttrain vllm-serve``.
Importing this package imports neither accelerate nor vLLM.
"""

from posttrain.grpo.config import GrpoConfig
from posttrain.grpo.loss import LOSS_TYPES, LossConfig, group_advantages, loss_normalizer, policy_loss

__all__ = ["LOSS_TYPES", "GrpoConfig", "LossConfig", "group_advantages", "loss_normalizer", "policy_loss"]
