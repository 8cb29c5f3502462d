"""Serving checkpoints: text in and out of a rollout engine (:mod:`.generation`, shared with ``posttrain eval``),
the OpenAI API as vLLM serves it (:mod:`.protocol`, :mod:`.server`) over one ASGI transport (:mod:`.http`, shared
with ``posttrain vllm-serve``). Nothing in this package trains or changes a model's weights.
"""
