"""posttrain: post-training and alignment for language models.

Judge- and rule-filtered SFT, on-policy GRPO with the DAPO loss on verifiable rewards, and an in-tree
Mamba-2/Transformer hybrid (weight-compatible with transformers' GraniteMoeHybrid) with its own kernels.
"""

__version__ = "0.1.0"
