"""gigaslide.models.slide."""
