"""`python -m gigaslide` (and `torchrun -m gigaslide`) entry point."""

from gigaslide.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
