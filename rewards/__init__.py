"""posttrain.rewards: verifiable rewards (math, sandboxed code, tool calls, format) and the reward registry.

Installed as ``posttrain.rewards``; never import it as a top-level ``rewards`` module. Rewards never import
``posttrain.judges``: the judge reward reaches the registry through the ``posttrain.rewards`` entry-point group.
"""
