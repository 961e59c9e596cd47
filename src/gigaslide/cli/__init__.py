"""gigaslide.cli."""
