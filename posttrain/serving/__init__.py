"""Serving checkpoints of the in-tree model: text generation on the native engine and an OpenAI-compatible server.

``posttrain serve`` (``posttrain.serving.server``) answers ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models``; ``posttrain eval`` reuses :class:`TextGenerator` for the same decoding rules (EOS, stop strings,
tool calls). Nothing in this package trains or changes a model's weights.
"""

from posttrain.serving.batching import BatchScheduler, SchedulerStats
from posttrain.serving.generation import TextCompletion, TextGenerator, load_checkpoint

__all__ = ["BatchScheduler", "SchedulerStats", "TextCompletion", "TextGenerator", "load_checkpoint"]
