"""gigaslide.preprocess."""
