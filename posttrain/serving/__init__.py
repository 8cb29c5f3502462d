"""Serving checkpoints: text in and out of a rollout engine, and an OpenAI-compatible server.

``posttrain serve`` (``posttrain.serving.server``) answers ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models``; ``posttrain eval`` reuses :class:`TextGenerator` for the same decoding rules (EOS, stop strings,
tool calls). Nothing in this package trains or changes a model's weights.
"""

from posttrain.serving.generation import TextCompletion, TextGenerator, load_checkpoint

__all__ = ["TextCompletion", "TextGenerator", "load_checkpoint"]
