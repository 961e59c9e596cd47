"""gigaslide.models.encoders."""
