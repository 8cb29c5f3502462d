"""posttrain.grpo: on-policy GRPO with the DAPO loss (and grpo, dr_grpo, gspo) on verifiable rewards.

``trainer.GrpoTrainer`` runs the loop on the training chassis: ``collect`` (engine calls, rewards, dynamic
sampling) -> ``loss`` (advantages, policy losses) -> several optimizer steps on ``batch``'s packed rows, scored by
``policy``; ``config``, ``data`` and ``metrics`` hold its settings, inputs and reports. The rollout engines,
multi-turn and asynchronous rollouts and the weight sync live in ``posttrain.rollout``; ``server`` here is the HTTP
side of ``posttrain vllm-serve``. Importing this package imports neither accelerate nor vLLM.
"""
