"""Serving checkpoints: text in and out of a rollout engine, and the OpenAI API as vLLM serves it.

``posttrain serve`` (``posttrain.serving.server``) answers chat and completions (log-probs, echo, grammars,
penalties, streaming), ``/v1/models``, ``/tokenize``, ``/detokenize``, ``/version`` and ``/metrics``; requests are
validated by ``posttrain.serving.protocol`` and carried by the ASGI transport of ``posttrain.serving.http``, which
``posttrain vllm-serve`` shares. ``posttrain eval`` reuses :class:`TextGenerator` for the same decoding rules (EOS,
stop strings, tool calls). Nothing in this package trains or changes a model's weights.
"""

from posttrain.serving.generation import TextCompletion, TextGenerator, load_checkpoint

__all__ = ["TextCompletion", "TextGenerator", "load_checkpoint"]
