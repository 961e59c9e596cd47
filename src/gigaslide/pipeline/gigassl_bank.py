"""The Giga-SSL augmented embedding bank (paper, section 3.2): ``gigaslide gigassl bank``.

For every slide of a tiling output: draw ``n_aug`` tile augmentations and, for each, ``n_tiles``
tiles at random among the slide's tissue tiles (without replacement; with replacement only when the
slide has fewer tiles); read them with the threaded :class:`~gigaslide.data.tile_loader.TileLoader`,
augment them on the device (:class:`~gigaslide.data.tile_augment.TileAugment`; one parameter set
shared by all tiles of a view, or one per tile with ``shared=False``, the paper's "NS" ablation),
and embed them with the frozen tile encoder. The result, ``OUT/h5_files/<slide_id>.h5`` with
features (n_aug, n_tiles, D) and coords (n_aug, n_tiles, 2), is described in
:mod:`gigaslide.data.gigassl_bank`.

Every draw comes from ``np.random.default_rng([seed, hash(slide_id)])``: a slide's bank does not
depend on the other slides, the rank or a resume. The machinery is ``gigaslide embed``'s: the
manifest (``OUT/manifest.csv``, one row per slide), skipping finished slides with the same
fingerprint, resuming an interrupted slide at its next augmentation, recording a failing slide and
carrying on, sharding slides over ``torchrun`` ranks.

With ``identity_view=True`` every slide also gets its identity (non-augmented) view, the input of
``gigaslide gigassl encode``: all of its tissue tiles embedded without augmentation by ``gigaslide
embed``'s own per-slide code (same transform, loader, file and resume), in
``OUT/identity/h5_files/<slide_id>.h5``; see :mod:`gigaslide.data.gigassl_bank`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gigaslide.data.feature_writer import array_sha256, make_fingerprint, stored_fingerprint
from gigaslide.data.gigassl_bank import BANK_SUBDIR, IDENTITY_SUBDIR, BankWriter
from gigaslide.data.tile_augment import TileAugment, params_row
from gigaslide.data.tile_dataset import TileDataset
from gigaslide.data.tile_loader import TileLoader
from gigaslide.pipeline.embed_inputs import EmbedInputError, SlideJob, discover_jobs
from gigaslide.pipeline.embed_job import STORE_DTYPES, _Embedder, prepare_job
from gigaslide.pipeline.extract import encode_batch
from gigaslide.pipeline.slide_jobs import MANIFEST, JobSummary, run_slide_jobs
from gigaslide.utils import dist as gdist
from gigaslide.utils.manifest import STATUS_DONE, STATUS_FAILED

log = logging.getLogger(__name__)

BANK_COLUMNS = (
    "slide_id",
    "status",
    "n_aug",
    "n_tiles",
    "dim",
    "seconds",
    "tiles_per_s",
    "error",
    "bank_file",
    "resumed_from",
    "rank",
)


@dataclass
class BankSlideResult:
    """Outcome of one slide (one manifest row); ``resumed_from`` counts augmentations."""

    slide_id: str
    status: str
    n_aug: int = 0
    n_tiles: int = 0
    dim: int = 0
    seconds: float = 0.0
    error: str = ""
    bank_file: str = ""
    resumed_from: int = 0
    computed: int = 0  # tiles encoded in this run
    rank: int = 0
    skipped: bool = False

    def row(self) -> dict[str, Any]:
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        return {
            "status": self.status,
            "n_aug": self.n_aug,
            "n_tiles": self.n_tiles,
            "dim": self.dim,
            "seconds": f"{self.seconds:.3f}",
            "tiles_per_s": f"{rate:.1f}",
            "error": self.error,
            "bank_file": self.bank_file,
            "resumed_from": self.resumed_from,
            "rank": self.rank,
        }


def slide_seed(seed: int, slide_id: str) -> list[int]:
    """Seed sequence of a slide's draws: the run seed and a stable 64-bit hash of the slide id."""
    return [int(seed), int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "little")]


def draw_views(
    n_available: int, n_aug: int, n_tiles: int, augment: TileAugment, shared: bool, rng: np.random.Generator
) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """Tile rows (n_aug, n_tiles) and per-tile augmentation parameters of every view of one slide."""
    replace = n_available < n_tiles
    rows = np.stack([rng.choice(n_available, size=n_tiles, replace=replace) for _ in range(n_aug)])
    params = [augment.sample(n_tiles, rng, shared=shared) for _ in range(n_aug)]
    return rows, params


class _Banker:
    """Per-run state shared by the slides of one rank (reuses the embedding job's helpers)."""

    def __init__(self, encoder: nn.Module, out: Path, opts: dict[str, Any]) -> None:
        self.embedder = _Embedder(encoder, out, {**opts, "save_pt": False, "chunk_size": 1})
        self.encoder = encoder
        self.opts = opts
        self.augment: TileAugment = opts["augment"]
        self.device: torch.device = opts["device"]
        size = self.embedder.transform.input_size
        self.input_size = size
        self.mean = torch.tensor(self.embedder.transform.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.embedder.transform.std, device=self.device).view(1, 3, 1, 1)
        self.dim = int(encoder.meta.embed_dim)
        self.identity = (
            _Embedder(encoder, out / IDENTITY_SUBDIR, {**opts, "save_pt": False, "chunk_size": 4096})
            if opts["identity_view"]
            else None
        )

    def run_identity(self, job: SlideJob, n: int, pbar: tqdm) -> int:
        """Write the slide's identity view when asked (skipped when complete); returns the tiles computed."""
        if self.identity is None:
            return 0
        pbar.total = (pbar.total or 0) + n
        return self.identity.run_slide(job, pbar).computed

    def fingerprint(self, coords: np.ndarray, coords_attrs: dict[str, Any]) -> str:
        o = self.opts
        return make_fingerprint(
            encoder=self.encoder.meta.name,
            weights_sha256=self.embedder.weights_sha,
            coords=array_sha256(coords),
            spec=str(coords_attrs.get("gigaslide_spec", sorted(coords_attrs.items()))),
            precision=o["precision"],
            dtype=o["store_dtype"],
            n_aug=o["n_aug"],
            n_tiles=o["n_tiles"],
            shared=o["shared"],
            seed=o["seed"],
            augment=repr(self.augment),
            transform=repr(self.embedder.transform),
        )

    def encode_view(self, images: torch.Tensor, params: dict[str, np.ndarray]) -> np.ndarray:
        """(T, 3, S, S) uint8 tiles -> augmented -> normalised -> (T, D) float32 features."""
        feats = []
        step = self.opts["batch_size"]
        for lo in range(0, images.shape[0], step):
            x = images[lo : lo + step].to(self.device, non_blocking=True).float().div_(255.0)
            part = {k: v[lo : lo + step] for k, v in params.items()}
            x = self.augment(x, part)
            if tuple(x.shape[2:]) != tuple(self.input_size):
                x = F.interpolate(
                    x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True
                )
            x = (x - self.mean) / self.std
            feats.append(
                encode_batch(
                    self.encoder, x, self.device, self.opts["precision"], self.embedder.channels_last
                )
            )
        return torch.cat(feats).numpy()

    def run_slide(self, job: SlideJob, pbar: tqdm) -> BankSlideResult:
        t0 = time.perf_counter()
        if job.error:
            raise EmbedInputError(job.error)
        assert job.slide_path is not None
        o = self.opts
        n_aug, n_tiles = o["n_aug"], o["n_tiles"]
        cf = self.embedder.read_job_coords(job)
        if cf.coords.shape[0] == 0:
            raise ValueError(f"{job.coords_path}: the slide has no tissue tile to sample; check its tiling")
        self.embedder.check_resolution(job.slide_id, cf.spec.target_mpp)
        identity = self.run_identity(job, int(cf.coords.shape[0]), pbar)
        rng = np.random.default_rng(slide_seed(o["seed"], job.slide_id))
        rows, params = draw_views(cf.coords.shape[0], n_aug, n_tiles, self.augment, o["shared"], rng)
        coords = cf.coords[rows]  # (n_aug, n_tiles, 2)
        fp = self.fingerprint(cf.coords, cf.attrs)
        final = self.embedder.out_dir / BANK_SUBDIR / f"{job.slide_id}.h5"
        total = n_aug * n_tiles
        if final.exists():
            if stored_fingerprint(final) != fp:
                raise FileExistsError(
                    f"{final} exists but was made with other settings (encoder, weights, augmentations, "
                    "n_aug, n_tiles, seed or coordinates); write to a new --out folder or delete the file"
                )
            pbar.total = max(0, (pbar.total or 0) - total)
            pbar.refresh()
            return BankSlideResult(
                job.slide_id, STATUS_DONE, n_aug, n_tiles, self.dim, time.perf_counter() - t0,
                bank_file=str(final), computed=identity, skipped=identity == 0,
            )  # fmt: skip
        attrs = {
            **self.embedder.features_attrs(job.slide_id, cf.spec, fp),
            "n_aug": n_aug,
            "n_tiles": n_tiles,
            "shared": bool(o["shared"]),
            "seed": int(o["seed"]),
            "tile_augment": repr(self.augment),
        }
        if o["shared"]:
            attrs["augmentations"] = json.dumps([params_row(p, 0) for p in params])
        with BankWriter(
            final, coords, self.dim, fp, dtype=STORE_DTYPES[o["store_dtype"]], features_attrs=attrs,
            coords_attrs=cf.attrs,
        ) as writer:  # fmt: skip
            start = writer.open()
            pbar.total = max(0, (pbar.total or 0) - start * n_tiles)
            pbar.refresh()
            dataset = TileDataset(job.slide_path, coords.reshape(-1, 2), cf.spec, mpp=job.mpp)
            loader = TileLoader(
                dataset,
                batch_size=n_tiles,  # one batch = one view
                num_threads=o["num_workers"],
                start=start * n_tiles,
                pin_memory=self.device.type == "cuda",
                reuse_buffers=True,
            )
            for aug, (images, got) in enumerate(loader, start=start):
                if not np.array_equal(got.numpy(), coords[aug]):
                    raise RuntimeError(f"{job.slide_id}: tiles of augmentation {aug} arrived out of order")
                writer.write(self.encode_view(images, params[aug]))
                pbar.update(n_tiles)
            writer.finalize()
        secs = time.perf_counter() - t0
        computed = (n_aug - start) * n_tiles + identity
        return BankSlideResult(
            job.slide_id, STATUS_DONE, n_aug, n_tiles, self.dim, secs, "", str(final), start, computed
        )


def build_gigassl_bank(
    coords_dir: str | os.PathLike[str],
    encoder: str | nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    n_aug: int = 50,
    n_tiles: int = 256,
    shared: bool = True,
    identity_view: bool = False,
    augment: TileAugment | None = None,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 4,
    precision: str = "fp32",
    device: str | torch.device = "auto",
    store_dtype: str = "float32",
    slides: str | os.PathLike[str] | None = None,
    slide_mpp: float | None = None,
    dist_info: gdist.DistInfo | None = None,
    progress: bool = True,
) -> JobSummary:
    """Build the augmented embedding bank of every slide of ``coords_dir`` in ``out_dir`` (module docstring).

    Args:
        coords_dir: tiling output folder (or CLAM/TRIDENT patches folder with ``slides``).
        encoder: encoder name (with ``weights``) or a built encoder; frozen, in eval mode.
        n_aug: augmentations per slide; n_tiles: tiles per augmentation.
        shared: one augmentation shared by all tiles of a view (False = the paper's "NS" ablation).
        identity_view: also embed all tissue tiles without augmentation (module docstring), the
            views ``gigassl encode`` draws from; it can be added to a finished bank by a rerun.
        augment: the tile augmentation (default :class:`TileAugment` ()).
        seed: base seed of the tile and augmentation draws.
        batch_size: tiles per encoder call (a view of ``n_tiles`` tiles is encoded in such chunks).
        num_workers: tile reader threads; precision, device, store_dtype, slides, slide_mpp,
            dist_info, progress: as for :func:`gigaslide.pipeline.embed_job.run_embedding`.
    """
    t0 = time.perf_counter()
    if n_aug < 1 or n_tiles < 1 or batch_size < 1:
        raise ValueError(f"n_aug, n_tiles and batch_size must be >= 1, got {n_aug}, {n_tiles}, {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    out, info, dev, encoder = prepare_job(
        out_dir, encoder, weights, device, precision, store_dtype, dist_info
    )
    jobs = discover_jobs(coords_dir, slides=slides, slide_mpp=slide_mpp)
    opts = {
        "device": dev,
        "precision": precision,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "loader": "threads",
        "store_dtype": store_dtype,
        "n_aug": int(n_aug),
        "n_tiles": int(n_tiles),
        "shared": bool(shared),
        "identity_view": bool(identity_view),
        "seed": int(seed),
        "augment": augment or TileAugment(),
    }
    banker = _Banker(encoder, out, opts)
    if banker.embedder.random_init:
        log.warning(
            "RANDOM WEIGHTS: encoder %s has no pretrained weights; the bank is not meaningful",
            encoder.meta.name,
        )

    def failure(job: SlideJob, seconds: float, error: str) -> BankSlideResult:
        return BankSlideResult(job.slide_id, STATUS_FAILED, n_aug, n_tiles, seconds=seconds, error=error)

    results = run_slide_jobs(
        jobs,
        banker.run_slide,
        failure,
        out=out,
        columns=BANK_COLUMNS,
        output_file=lambda sid: out / BANK_SUBDIR / f"{sid}.h5",
        work=lambda j: n_aug * n_tiles,
        dist_info=info,
        unit="tile",
        desc="bank",
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    return JobSummary(
        out, out / MANIFEST, results, seconds, banker.embedder.random_init, "banked", "tiles embedded"
    )
