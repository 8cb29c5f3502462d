"""Models trained by posttrain: the in-tree Granite models (``posttrain.models.hybrid``)."""
