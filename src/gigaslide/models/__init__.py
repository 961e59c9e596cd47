"""gigaslide.models."""
