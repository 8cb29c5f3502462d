"""posttrain.kernels: Triton kernels for the hybrid model and their pure-torch references.

Installed as ``posttrain.kernels``; never import it as a top-level ``kernels`` module (that name is Hugging
Face's own package).
"""
