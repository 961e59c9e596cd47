"""gigaslide.synth."""
