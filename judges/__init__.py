"""posttrain.judges: rule filters, dedup, LLM-as-judge backends and the filtering pipeline.

Installed as ``posttrain.judges``; never import it as a top-level ``judges`` module. The pieces:
``config`` (YAML -> dataclasses), ``samples`` (JSONL/Parquet/datasets in and out), ``rules``, ``dedup``,
``judge`` with ``backends``/``cache``/``parsing``/``rubrics``, ``pipeline.run_filter`` (what ``posttrain filter``
runs), ``reward`` (the ``llm_judge`` reward) and ``scripted_server`` (a deterministic judge server for tests).
Importing this package loads only the configuration; the heavy parts load when used.
"""

from posttrain.judges.config import ConfigError, FilterConfig, JudgeConfig, config_from_dict, load_config

__all__ = ["ConfigError", "FilterConfig", "JudgeConfig", "config_from_dict", "load_config"]
