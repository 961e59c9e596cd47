"""gigaslide.io."""
