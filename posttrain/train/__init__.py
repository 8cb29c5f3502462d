"""Training components shared by pre-training, SFT and GRPO: data, schedules, checkpoints, the loop.

- ``posttrain.train.data``: reading/checking/tokenizing rows, packing, collation, ``BatchPlan``.
- ``posttrain.train.schedules``: warmup+cosine, WSD, constant.
- ``posttrain.train.checkpointing``: ``CheckpointManager`` (atomic, exact-resume checkpoints, verified against
  their manifest before resuming).
- ``posttrain.train.loop``: ``build_accelerator``, ``build_optimizer``, ``global_token_count``, ``MetricsLog``,
  ``Trainer``.
- ``posttrain.train.run``: one run from a recipe (``run_training``, ``run_stages``, ``save_final``).
"""
