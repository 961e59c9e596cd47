"""gigaslide.train."""
