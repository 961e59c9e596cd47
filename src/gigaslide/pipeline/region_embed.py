"""HIPT region features: every region of a tiling output -> (M, 256, 384) ViT_256 token grids.

``run_region_embedding(TILING_DIR, "hipt_vit256", OUT)`` reads the regions that
``gigaslide tile --region-size 4096`` wrote (``TILING_DIR/regions/<slide_id>.h5``, 4096 px at
0.5 um/px), reads each region whole (parts outside the slide come back white), unrolls it into its
16x16 patches of 256 px and encodes them with ViT_256 in batches. Per slide it writes
``OUT/h5_files/<slide_id>.h5`` (see :mod:`gigaslide.data.region_features`): the token grids, the
patch mask (patches overlapping the slide), the region coordinates and, with ``vit4k_weights``,
the ViT_4096 region tokens (M, 192).

Like tile embedding: files are written atomically, a slide whose file exists with the same
fingerprint is skipped, a failing slide is recorded in ``OUT/manifest.csv`` and the run carries
on, and under ``torchrun`` slides are sharded over ranks (rank manifests merged by rank 0).
A region costs seconds to a minute on a CPU, so an interrupted slide resumes inside itself:
every ``chunk_regions`` regions are committed atomically to ``OUT/.partial/<slide_id>/``
(``chunk_<first region>.npz``, under a fingerprint), a rerun keeps the chunks of the same
fingerprint and encodes the rest, and the folder is deleted once the slide's file is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gigaslide import __version__
from gigaslide.data.feature_writer import array_sha256, make_fingerprint, stored_fingerprint
from gigaslide.data.region_features import region_patch_mask, write_region_features
from gigaslide.data.tile_dataset import TileDataset
from gigaslide.data.transforms import TileTransform
from gigaslide.models.encoders.hipt_region import HIPTRegionEncoder
from gigaslide.pipeline.embed_inputs import EmbedInputError, SlideJob, discover_jobs
from gigaslide.pipeline.embed_job import (
    MANIFEST_COLUMNS,
    STORE_DTYPES,
    SlideResult,
    failed_slide,
    prepare_job,
)
from gigaslide.pipeline.extract import (
    autocast_context,
    weights_identity,
)
from gigaslide.pipeline.slide_jobs import MANIFEST, JobSummary, run_slide_jobs
from gigaslide.preprocess.coords_io import read_coords
from gigaslide.utils import dist as gdist
from gigaslide.utils.atomic import atomic_path, atomic_write_text
from gigaslide.utils.manifest import STATUS_DONE

log = logging.getLogger(__name__)

PATCH_SIZE = 256


def region_jobs(
    tiling_dir: str | os.PathLike[str],
    slides: str | os.PathLike[str] | None = None,
    slide_mpp: float | None = None,
) -> list[SlideJob]:
    """The slides of a tiling output, each pointing at its ``regions/<slide_id>.h5`` file."""
    root = Path(tiling_dir)
    jobs = []
    for job in discover_jobs(root, slides=slides, slide_mpp=slide_mpp):
        path = root / "regions" / f"{job.slide_id}.h5"
        err = job.error
        if not err and not path.exists():
            err = (
                f"no region file {path}: the slide has no region with tissue, or the tiling was run "
                "without regions; run `gigaslide tile ... --region-size 4096` first"
            )
        n = 0
        if path.exists():
            import h5py

            with h5py.File(path, "r") as f:
                n = int(f["coords"].shape[0]) if "coords" in f else 0
        jobs.append(replace(job, coords_path=path, n_tiles=n, error=err))
    return jobs


class _PartialRegions:
    """Committed chunks of an interrupted slide: ``OUT/.partial/<slide_id>/chunk_<start>.npz``."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root, self.fingerprint = root, fingerprint
        stamp = root / "fingerprint.json"
        if root.exists() and (
            not stamp.exists() or json.loads(stamp.read_text()).get("fingerprint") != fingerprint
        ):
            shutil.rmtree(root)  # chunks of other weights/regions/precision are never mixed in
        root.mkdir(parents=True, exist_ok=True)
        if not stamp.exists():
            atomic_write_text(stamp, json.dumps({"fingerprint": fingerprint}))

    def load(self) -> dict[int, dict[str, np.ndarray]]:
        """{first region index: {"tokens", ["region"]}} of every committed chunk."""
        out = {}
        for f in sorted(self.root.glob("chunk_*.npz")):
            with np.load(f) as z:
                out[int(f.stem.split("_")[1])] = {k: z[k] for k in z.files}
        return out

    def commit(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        with atomic_path(self.root / f"chunk_{start:07d}.npz") as tmp, tmp.open("wb") as fh:
            np.savez(fh, **arrays)  # a file object: np.savez would append ".npz" to a path

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class _RegionEmbedder:
    """Per-run state: the two-stage encoder, its identity and the output conventions."""

    def __init__(self, encoder: HIPTRegionEncoder, meta: Any, out: Path, opts: dict[str, Any]) -> None:
        self.encoder, self.meta, self.out, self.opts = encoder, meta, out, opts
        self.device: torch.device = opts["device"]
        self.weights, self.weights_sha, self.random_init = weights_identity(encoder.vit256)
        self.vit4k_sha = weights_identity(encoder.vit4k)[1] if encoder.vit4k is not None else ""
        self.dtype = np.dtype(STORE_DTYPES[opts["store_dtype"]])

    def run_slide(self, job: SlideJob, pbar: tqdm) -> SlideResult:
        t0 = time.perf_counter()
        if job.error:
            raise EmbedInputError(job.error)
        assert job.slide_path is not None
        cf = read_coords(job.coords_path, slide_mpp=job.mpp)
        spec, coords = cf.spec, cf.coords  # regions (M, 2)
        if len(coords) == 0:
            raise ValueError(
                f"{job.coords_path}: the slide has no region with enough tissue; re-tile with a lower "
                "--region-min-tissue (0 keeps any region touching tissue)"
            )
        if spec.tile_size % PATCH_SIZE:
            raise ValueError(
                f"{job.coords_path}: regions of {spec.tile_size} px are not a whole number of {PATCH_SIZE} px "
                "patches; tile with --region-size 4096 (HIPT)"
            )
        fp = make_fingerprint(
            kind="hipt_regions",
            weights_sha256=self.weights_sha,
            vit4k_sha256=self.vit4k_sha,
            coords=array_sha256(coords),
            spec=str(cf.attrs.get("gigaslide_spec", sorted(cf.attrs.items()))),
            precision=self.opts["precision"],
            dtype=self.dtype.name,
        )
        final = self.out / "h5_files" / f"{job.slide_id}.h5"
        m, dim = len(coords), int(self.meta.embed_dim)
        if final.exists():
            if stored_fingerprint(final) != fp:
                raise FileExistsError(
                    f"{final} exists but was made with other weights, precision or regions; "
                    "write to a new --out folder or delete the file"
                )
            pbar.update(m)
            return SlideResult(job.slide_id, STATUS_DONE, m, dim, 0.0, 0.0, "", str(final), skipped=True)
        mask = region_patch_mask(coords, spec, PATCH_SIZE)  # (M, T)
        transform = TileTransform(spec.tile_size, self.meta.mean, self.meta.std)  # whole region, no resize
        step = self.opts["chunk_regions"]
        partial = _PartialRegions(self.out / ".partial" / job.slide_id, f"{fp}:{step}")
        chunks = partial.load()
        resumed = sum(len(c["tokens"]) for c in chunks.values())
        pbar.update(resumed)
        dataset = TileDataset(job.slide_path, coords, spec, mpp=job.mpp)
        try:
            for start in range(0, m, step):
                if start in chunks and len(chunks[start]["tokens"]) == min(step, m - start):
                    continue
                tok, reg = [], []
                for i in range(start, min(start + step, m)):
                    image = transform(dataset.read_tile(i)).unsqueeze(0).to(self.device)  # (1, 3, S, S)
                    pm = torch.from_numpy(mask[i : i + 1]).to(self.device)
                    with torch.inference_mode(), autocast_context(self.device, self.opts["precision"]):
                        out = self.encoder(image, pm)
                    tok.append(out.tokens[0].float().cpu().numpy().astype(self.dtype))  # (T, D)
                    if out.region is not None:
                        reg.append(out.region[0].float().cpu().numpy().astype(self.dtype))  # (192,)
                    pbar.update(1)
                chunks[start] = {"tokens": np.stack(tok), **({"region": np.stack(reg)} if reg else {})}
                partial.commit(start, chunks[start])
        finally:
            dataset.close()
        ordered = [chunks[k] for k in sorted(chunks)]
        tokens = np.concatenate([c["tokens"] for c in ordered])  # (M, T, D)
        regions = np.concatenate([c["region"] for c in ordered]) if "region" in ordered[0] else None
        if len(tokens) != m:
            raise RuntimeError(
                f"{job.slide_id}: {len(tokens)} region rows for {m} regions; delete {partial.root}"
            )
        attrs = {
            "encoder": self.meta.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha,
            "embed_dim": dim,
            "precision": self.opts["precision"],
            "gigaslide_version": __version__,
            "target_mpp": float(spec.target_mpp),
            "region_size": int(spec.tile_size),
            "patch_size": PATCH_SIZE,
            "grid": [spec.tile_size // PATCH_SIZE] * 2,
            "random_init": bool(self.random_init),
            "slide_id": job.slide_id,
            "fingerprint": fp,
        }
        region_attrs = None
        if regions is not None:
            info = getattr(self.encoder.vit4k, "weights_info", {})
            region_attrs = {"model": "hipt_vit4k", "weights": str(info.get("file", "RANDOM-INIT"))}
            region_attrs["weights_sha256"] = self.vit4k_sha
        write_region_features(final, tokens, mask, coords, regions, attrs, cf.attrs, region_attrs)
        partial.remove()
        secs = time.perf_counter() - t0
        done = m - resumed
        return SlideResult(
            job.slide_id,
            STATUS_DONE,
            m,
            dim,
            secs,
            done / secs,
            "",
            str(final),
            resumed_from=resumed,
            computed=done,
        )


def run_region_embedding(
    tiling_dir: str | os.PathLike[str],
    encoder: str | nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    vit4k: str | os.PathLike[str] | nn.Module | None = None,
    batch_size: int = 64,
    precision: str = "fp32",
    device: str | torch.device = "auto",
    slides: str | os.PathLike[str] | None = None,
    slide_mpp: float | None = None,
    store_dtype: str = "float32",
    chunk_regions: int = 8,
    dist_info: gdist.DistInfo | None = None,
    progress: bool = True,
) -> JobSummary:
    """Embed the HIPT regions of every slide of ``tiling_dir`` into ``out_dir`` (module docstring).

    Args:
        encoder: ``"hipt_vit256"`` (or another ViT tile encoder name) or a built encoder with ``.meta``.
        weights: its checkpoint when ``encoder`` is a name.
        vit4k: ``vit4k_xs_dino.pth`` (path), ``"random"``, or a built :class:`HIPTViT4K` to also store
            the (M, 192) region tokens; None stores the token grids only.
        batch_size: 256 px patches per ViT_256 call.
        precision: ``fp32|fp16|bf16`` autocast (bf16/fp16 for GPUs); device: ``auto|cpu|cuda[:i]``.
        chunk_regions: regions per committed chunk of an unfinished slide (resume granularity).
        slides, slide_mpp, store_dtype, dist_info, progress: as for tile embedding.
    """
    t0 = time.perf_counter()
    if chunk_regions < 1:
        raise ValueError(f"chunk_regions must be >= 1, got {chunk_regions}")
    out, info, dev, encoder = prepare_job(
        out_dir, encoder, weights, device, precision, store_dtype, dist_info
    )
    if isinstance(vit4k, (str, os.PathLike)):
        from gigaslide.models.encoders import create_hipt_vit4k

        vit4k = create_hipt_vit4k(weights=None if str(vit4k) == "random" else vit4k)
    two_stage = HIPTRegionEncoder(encoder, vit4k, batch_size=batch_size).eval().to(dev)
    jobs = region_jobs(tiling_dir, slides=slides, slide_mpp=slide_mpp)
    opts = {"device": dev, "precision": precision, "store_dtype": store_dtype, "chunk_regions": chunk_regions}
    embedder = _RegionEmbedder(two_stage, encoder.meta, out, opts)
    results = run_slide_jobs(
        jobs,
        embedder.run_slide,
        failed_slide,
        out=out,
        columns=MANIFEST_COLUMNS,
        dist_info=info,
        unit="region",
        desc="regions",
        progress=progress,
    )
    return JobSummary(
        out, out / MANIFEST, results, time.perf_counter() - t0, embedder.random_init, unit="regions"
    )
