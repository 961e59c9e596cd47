"""gigaslide.pipeline."""
