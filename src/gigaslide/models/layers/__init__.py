"""gigaslide.models.layers."""
