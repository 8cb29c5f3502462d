"""Models trained by posttrain: the in-tree Granite models (``posttrain.models.hybrid``: the Granite 4.0-H hybrid
and dense Granite)."""
