"""Batch feature extraction over a tiling output (or a CLAM/TRIDENT patches folder).

For every slide: ``OUT/h5_files/<slide_id>.h5`` (``features`` (N, D) + ``coords`` (N, 2) with
the tile spec; (N, ...) for encoders whose ``meta.output_shape`` is N-D, e.g. HIPT region grids),
optionally ``OUT/pt_files/<slide_id>.pt`` (2-D only), and a row in ``OUT/manifest.csv``.
Rows stream through :class:`~gigaslide.data.feature_writer.ChunkedFeatureWriter`, so memory
does not grow with slide size and an interrupted slide resumes from its last chunk. A slide
whose file exists with the same fingerprint is skipped; a failing slide is recorded and the
job carries on. Under ``torchrun`` slides are sharded over global ranks; each rank writes
``manifest.rank<r>.csv`` and rank 0 merges them into ``manifest.csv``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gigaslide import __version__
from gigaslide.data.feature_writer import (
    ChunkedFeatureWriter,
    array_sha256,
    make_fingerprint,
    stored_fingerprint,
)
from gigaslide.data.tile_dataset import TileDataset
from gigaslide.data.transforms import TileTransform
from gigaslide.pipeline.embed_inputs import EmbedInputError, SlideJob, discover_jobs
from gigaslide.pipeline.extract import (
    check_loader,
    check_precision,
    iter_features,
    make_batches,
    prepare_encoder,
    warn_half_precision_on_cpu,
    weights_identity,
)
from gigaslide.pipeline.slide_jobs import MANIFEST, JobSummary, run_slide_jobs
from gigaslide.preprocess.coords_io import CoordsFile, read_coords
from gigaslide.utils import dist as gdist
from gigaslide.utils.atomic import atomic_path
from gigaslide.utils.device import resolve_device
from gigaslide.utils.manifest import STATUS_DONE, STATUS_FAILED

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "slide_id",
    "status",
    "n_tiles",
    "dim",
    "seconds",
    "tiles_per_s",
    "error",
    "features_file",
    "resumed_from",
    "rank",
)
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class SlideResult:
    """Outcome of one slide (one manifest row)."""

    slide_id: str
    status: str
    n_tiles: int = 0
    dim: int | str = 0  # D, or e.g. "256x384" for N-D items
    seconds: float = 0.0
    tiles_per_s: float = 0.0
    error: str = ""
    features_file: str = ""
    resumed_from: int = 0
    computed: int = 0  # rows computed in this run
    rank: int = 0
    skipped: bool = False  # already complete before this run

    def row(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "n_tiles": self.n_tiles,
            "dim": self.dim,
            "seconds": f"{self.seconds:.3f}",
            "tiles_per_s": f"{self.tiles_per_s:.1f}",
            "error": self.error,
            "features_file": self.features_file,
            "resumed_from": self.resumed_from,
            "rank": self.rank,
        }


def failed_slide(job: SlideJob, seconds: float, error: str) -> SlideResult:
    """The manifest row of a slide whose run raised ``error`` after ``seconds``."""
    return SlideResult(job.slide_id, STATUS_FAILED, job.n_tiles, seconds=seconds, error=error)


def feature_file_damage(path: Path, n_rows: int, item_shape: tuple[int, ...], fingerprint: str) -> str | None:
    """Why a finished feature file is unusable (unreadable, truncated, wrong shape for its own
    fingerprint), or None when it reads back or belongs to another run (another fingerprint: the
    caller refuses it). Reads the structure and the last row only."""
    try:
        with h5py.File(path, "r") as f:
            ds = f.get("features")
            if not isinstance(ds, h5py.Dataset):
                return "no 'features' dataset"
            stored = ds.attrs.get("fingerprint")
            stored = stored.decode() if isinstance(stored, bytes) else stored
            if stored is not None and str(stored) != fingerprint:
                return None
            if tuple(ds.shape) != (n_rows, *item_shape):
                return f"features shape {ds.shape}, expected {(n_rows, *item_shape)}"
            if n_rows:
                ds[n_rows - 1]  # a truncated file fails here
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        return f"unreadable: {' '.join(str(e).split())}"
    return None


# -- the job -------------------------------------------------------------------------------
class _Embedder:
    """Per-run state shared by all slides of one rank."""

    def __init__(self, encoder: nn.Module, out_dir: Path, opts: dict[str, Any]) -> None:
        self.encoder = encoder
        self.meta = encoder.meta
        self._mpp_warned: set[float] = set()
        self.out_dir = out_dir
        self.opts = opts
        self.device: torch.device = opts["device"]
        self.channels_last = prepare_encoder(encoder, self.device)
        self.transform = TileTransform.from_meta(self.meta)
        self.weights, self.weights_sha, self.random_init = weights_identity(encoder)
        self.dtype = np.dtype(STORE_DTYPES[opts["store_dtype"]])
        self.h5_dir = out_dir / "h5_files"
        self.pt_dir = out_dir / "pt_files"
        #: shape of one tile's output: (D,) or, for N-D encoders, ``meta.output_shape``
        self.item_shape: tuple[int, ...] = tuple(
            getattr(self.meta, "item_shape", None) or (int(self.meta.embed_dim),)
        )
        if opts["save_pt"] and len(self.item_shape) != 1:
            raise ValueError(
                f"save_pt writes CLAM's (N, D) pt_files, but encoder {self.meta.name} returns "
                f"{self.item_shape} per tile; embed without --save-pt (the h5 files hold the N-D features)"
            )

    def fingerprint(self, coords: np.ndarray, coords_attrs: dict[str, Any]) -> str:
        return make_fingerprint(
            encoder=self.meta.name,
            weights_sha256=self.weights_sha,
            coords=array_sha256(coords),
            spec=str(coords_attrs.get("gigaslide_spec", sorted(coords_attrs.items()))),
            precision=self.opts["precision"],
            dtype=self.dtype.name,
            transform=repr(self.transform),
        )

    def features_attrs(self, slide_id: str, spec: Any, fingerprint: str) -> dict[str, Any]:
        return {
            "encoder": self.meta.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha,
            "embed_dim": int(self.meta.embed_dim),
            "precision": self.opts["precision"],
            "gigaslide_version": __version__,
            "target_mpp": float(spec.target_mpp),
            "tile_size": int(spec.tile_size),
            "input_size": list(self.transform.input_size),
            "random_init": bool(self.random_init),
            "slide_id": slide_id,
            "fingerprint": fingerprint,
        }

    def write_pt(self, slide_id: str, h5_path: Path) -> Path:
        """CLAM's ``pt_files/<slide_id>.pt``: the (N, D) float tensor."""
        with h5py.File(h5_path, "r") as f:
            feats = torch.from_numpy(np.asarray(f["features"][:], dtype=np.float32))
        pt = self.pt_dir / f"{slide_id}.pt"
        with atomic_path(pt) as tmp:
            torch.save(feats, tmp)
        return pt

    def check_resolution(self, slide_id: str, tile_mpp: float) -> None:
        """Warn (once per resolution) when tiles are not at the resolution the encoder was trained at."""
        want = getattr(self.meta, "mpp", None)
        if not want or not np.isfinite(tile_mpp) or abs(tile_mpp / want - 1.0) <= 0.1:
            return
        key = round(float(tile_mpp), 4)
        if key not in self._mpp_warned:
            self._mpp_warned.add(key)
            log.warning(
                "%s: tiles are at %.3g um/px but encoder %s expects %.3g um/px; re-tile with "
                "`gigaslide tile --target-mpp %.3g` for features comparable to the encoder's training data",
                slide_id,
                tile_mpp,
                self.meta.name,
                want,
                want,
            )

    def read_job_coords(self, job: SlideJob) -> CoordsFile:
        """The job's coordinates, with the tile resolution whenever it can be known.

        CLAM files store no physical resolution: without an mpp for the slide (``--slides`` CSV),
        the slide's metadata mpp is used, else ``--slide-mpp``; if none exists a warning says so.
        """
        cf = None
        if job.mpp is None:
            with contextlib.suppress(ValueError):  # TRIDENT files without a magnification need an mpp
                cf = read_coords(job.coords_path)
        if (
            cf is not None
            and np.isfinite(cf.spec.slide_mpp)
            and cf.spec.extra.get("mpp_source") != "magnification"  # TRIDENT's 20x is nominal: ask the slide
        ):
            return cf
        mpp = job.mpp
        if mpp is None:
            from gigaslide.io import open_slide

            assert job.slide_path is not None
            with open_slide(job.slide_path, default_mpp=job.default_mpp) as slide:
                mpp = slide.mpp
        cf = read_coords(job.coords_path, slide_mpp=mpp)
        if not np.isfinite(cf.spec.slide_mpp):
            log.warning(
                "%s: the coordinates %s store no physical resolution (CLAM) and the slide %s has no mpp "
                "metadata: the tile resolution is unknown and the encoder-resolution check is skipped; "
                "pass --slide-mpp UM_PER_PX (or an `mpp` column in the --slides CSV)",
                job.slide_id,
                job.coords_path,
                job.slide_path,
            )
        return cf

    def run_slide(self, job: SlideJob, pbar: tqdm) -> SlideResult:
        t0 = time.perf_counter()
        if job.error:
            raise EmbedInputError(job.error)
        assert job.slide_path is not None
        cf = self.read_job_coords(job)
        coords = cf.coords  # (N, 2)
        n = int(coords.shape[0])
        self.check_resolution(job.slide_id, cf.spec.target_mpp)
        fp = self.fingerprint(coords, cf.attrs)
        final = self.h5_dir / f"{job.slide_id}.h5"
        item_shape = self.item_shape
        dim: int | str = item_shape[0] if len(item_shape) == 1 else "x".join(map(str, item_shape))
        damage = feature_file_damage(final, n, item_shape, fp) if final.exists() else None
        if damage is not None:  # a corrupt file is recomputed, not mistaken for another encoder's
            log.warning("%s is damaged (%s); computing it again", final, damage)
            final.unlink()
        if final.exists():
            if stored_fingerprint(final) != fp:
                raise FileExistsError(
                    f"{final} exists but was made with another encoder, weights, precision or coordinates; "
                    "write to a new --out folder or delete the file"
                )
            if self.opts["save_pt"] and not (self.pt_dir / f"{job.slide_id}.pt").exists():
                self.write_pt(job.slide_id, final)
            pbar.total = max(0, (pbar.total or 0) - n)
            pbar.refresh()
            return SlideResult(
                job.slide_id, STATUS_DONE, n, dim, 0.0, 0.0, "", str(final), skipped=True, resumed_from=n
            )
        attrs = self.features_attrs(job.slide_id, cf.spec, fp)
        writer = ChunkedFeatureWriter(
            final,
            coords,
            item_shape,
            fp,
            chunk_size=self.opts["chunk_size"],
            dtype=self.dtype,
            features_attrs=attrs,
            coords_attrs=cf.attrs,
        )
        with writer:
            start = writer.open()
            if start:
                pbar.total = max(0, (pbar.total or 0) - start)
                pbar.refresh()
            dataset = TileDataset(job.slide_path, coords, cf.spec, mpp=job.mpp)
            batches, preprocess = make_batches(
                dataset,
                self.transform,
                self.opts["loader"],
                self.opts["batch_size"],
                self.opts["num_workers"],
                self.device,
                start=start,
            )
            for feats, got in iter_features(
                self.encoder, batches, self.device, self.opts["precision"], self.channels_last, preprocess
            ):
                row = writer.rows_written
                if tuple(feats.shape[1:]) != item_shape:
                    raise ValueError(
                        f"the encoder returned {tuple(feats.shape[1:])} per tile, its meta says {item_shape} "
                        "(embed_dim, or output_shape for N-D outputs)"
                    )
                if not np.array_equal(got, coords[row : row + len(got)]):
                    raise RuntimeError(f"{job.slide_id}: tiles arrived out of order at row {row}")
                writer.write(feats)
                pbar.update(len(feats))
            writer.finalize()
        if self.opts["save_pt"]:
            self.write_pt(job.slide_id, final)
        secs = time.perf_counter() - t0
        computed = n - start
        return SlideResult(
            job.slide_id,
            STATUS_DONE,
            n,
            dim,
            secs,
            computed / secs if secs > 0 else 0.0,
            "",
            str(final),
            resumed_from=start,
            computed=computed,
        )


def prepare_job(
    out_dir: str | os.PathLike[str],
    encoder: str | nn.Module,
    weights: str | os.PathLike[str] | None,
    device: str | torch.device,
    precision: str,
    store_dtype: str,
    dist_info: gdist.DistInfo | None,
) -> tuple[Path, gdist.DistInfo, torch.device, nn.Module]:
    """The setup every slide job shares: check ``precision`` and ``store_dtype``, make ``out_dir``,
    resolve this rank's device and build ``encoder`` when it is a name (``weights`` only then)."""
    check_precision(precision)
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    info = dist_info or gdist.DistInfo()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device, local_rank=info.local_rank)
    if info.is_main:
        warn_half_precision_on_cpu(dev, precision)
    if isinstance(encoder, str):
        from gigaslide.models.encoders import create_encoder

        encoder = create_encoder(encoder, weights=weights)
    elif weights is not None:
        raise ValueError("weights= only applies when the encoder is given by name")
    return out, info, dev, encoder


def run_embedding(
    coords_dir: str | os.PathLike[str],
    encoder: str | nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    loader: str = "threads",
    precision: str = "fp32",
    device: str | torch.device = "auto",
    save_pt: bool = False,
    chunk_size: int = 4096,
    slides: str | os.PathLike[str] | None = None,
    slide_mpp: float | None = None,
    store_dtype: str = "float32",
    dist_info: gdist.DistInfo | None = None,
    progress: bool = True,
) -> JobSummary:
    """Embed every slide of ``coords_dir`` into ``out_dir`` (see the module docstring).

    Args:
        coords_dir: tiling output folder, or a CLAM/TRIDENT patches folder (then ``slides`` is needed).
        encoder: an encoder name for :func:`~gigaslide.models.encoders.create_encoder` or a built encoder.
        weights: checkpoint path when ``encoder`` is a name.
        batch_size: tiles per encoder call.
        num_workers: reader threads (``loader="threads"``) or DataLoader worker processes
            (``loader="processes"``); 0 reads in the main thread.
        loader: ``threads`` (TileLoader + normalisation on the device, default) or ``processes``
            (DataLoader workers read and normalise tiles); see :mod:`gigaslide.pipeline.extract`.
        precision: ``fp32|fp16|bf16`` (autocast); device: ``auto|cpu|cuda[:i]``.
        save_pt: also write CLAM's ``pt_files/<slide_id>.pt``.
        chunk_size: rows per committed chunk of the partial file (resume granularity).
        slides, slide_mpp: slide list and level-0 mpp override (see :func:`discover_jobs`).
        store_dtype: ``float32`` (default) or ``float16`` for the stored features.
        dist_info: this process's rank (from :func:`gigaslide.utils.dist.init_distributed`); None = one process.
        progress: show a tqdm bar with tiles/s.
    """
    t0 = time.perf_counter()
    check_loader(loader)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out, info, dev, encoder = prepare_job(
        out_dir, encoder, weights, device, precision, store_dtype, dist_info
    )
    jobs = discover_jobs(coords_dir, slides=slides, slide_mpp=slide_mpp)
    opts = {
        "device": dev,
        "precision": precision,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "loader": loader,
        "save_pt": save_pt,
        "chunk_size": chunk_size,
        "store_dtype": store_dtype,
    }
    embedder = _Embedder(encoder, out, opts)
    if embedder.random_init:  # create_encoder (or the CLI's banner) has warned: say it once
        log.info(
            "random weights: encoder %s has no pretrained weights; every file records random_init=True",
            encoder.meta.name,
        )
    results = run_slide_jobs(
        jobs,
        embedder.run_slide,
        failed_slide,
        out=out,
        columns=MANIFEST_COLUMNS,
        dist_info=info,
        unit="tile",
        desc="embed",
        progress=progress,
    )
    return JobSummary(out, out / MANIFEST, results, time.perf_counter() - t0, embedder.random_init)
