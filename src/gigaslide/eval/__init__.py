"""gigaslide.eval."""
