"""Models trained by posttrain: the in-tree hybrid (``posttrain.models.hybrid``)."""
