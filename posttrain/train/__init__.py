"""Training components shared by pre-training, SFT, DPO and GRPO: the chassis, configs, data, schedules, checkpoints.

- ``posttrain.train.config``: the config family's shared groups (``optim``, ``checkpoint``, ``logging``, ``run``,
  ``model``, ``lora``) and SFT's recipe.
- ``posttrain.train.chassis``: ``Chassis`` (accelerator, optimizer and schedule, clipping and the non-finite guard,
  checkpoints, metrics, the loop), what every trainer is built on.
- ``posttrain.train.data``: reading/checking/tokenizing rows, packing, collation, ``BatchPlan``.
- ``posttrain.train.schedules``: warmup+cosine, WSD, constant.
- ``posttrain.train.checkpointing``: ``CheckpointManager`` (atomic, exact-resume checkpoints, verified against
  their manifest before resuming).
- ``posttrain.train.loop``: SFT and pre-training on the chassis (``Trainer``, ``masked_nll_sum``, ``start_step``).
- ``posttrain.train.run``: one run from a recipe (``run_training``, ``run_stages``, ``start_run``, ``run_manifest``,
  ``save_final``).
"""
