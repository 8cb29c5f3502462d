"""Training components shared by pre-training, SFT, DPO and GRPO: ``chassis`` (what every trainer is built on),
``config`` (the config family's shared groups, SFT's recipe), ``data`` (rows, tokens, packing, ``BatchPlan``),
``schedules``, ``checkpointing``, ``loop`` (SFT and pre-training), ``run`` (one run from a recipe) and ``cli``.
"""
