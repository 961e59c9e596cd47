"""gigaslide.data."""
