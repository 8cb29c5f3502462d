"""posttrain.judges: rule filters, dedup, LLM-as-judge backends and the filtering pipeline.

Installed as ``posttrain.judges``; never import it as a top-level ``judges`` module.
"""
