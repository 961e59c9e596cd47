"""Shared utilities: atomic writes, manifests, seeding."""

from gigaslide.utils.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from gigaslide.utils.manifest import STATUS_DONE, STATUS_FAILED, Manifest
from gigaslide.utils.seed import seed_everything

__all__ = [
    "STATUS_DONE",
    "STATUS_FAILED",
    "Manifest",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "seed_everything",
]
