"""LongViT through the harness: slide-image cohort, image batches, cross-validated finetuning from the
`pretrain longvit` checkpoint, and the relevance heatmap of the trained run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from gigaslide.cli.main import main
from gigaslide.data.cohort import CohortError
from gigaslide.data.image_bags import ImageBagDataset, ImageCohort, collate_any
from gigaslide.data.slide_images import normalize_images, prepare_slide_images
from gigaslide.preprocess.slide_image import SlideImageSpec, load_slide_image

torch.set_num_threads(1)

SIZE = 256
MODEL_SETS = ["--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32",
              "--set", "model_kwargs.num_heads=4"]  # fmt: skip


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gigaslide.synth import make_cohort

    root = tmp_path_factory.mktemp("lv_cohort")
    table = make_cohort(root, n_slides=6, seed=3, width=1024, height=1024)
    report = prepare_slide_images(
        {r.slide_id: r.path for r in table.itertuples()}, SlideImageSpec(target_size=SIZE), root / "images"
    )
    assert not report.failed
    return root


def test_image_cohort_serves_normalised_images_and_token_masks(cohort_dir: Path) -> None:
    cohort = ImageCohort(cohort_dir / "labels.csv", cohort_dir / "images", input_size=SIZE)
    assert cohort.dim == 3 and cohort.input_size == SIZE and len(cohort) == 6 and cohort.n_classes == 2
    ds = ImageBagDataset(cohort, cohort.samples())
    batch = collate_any([ds[0], ds[1]])
    assert tuple(batch.x.shape) == (2, 3, SIZE, SIZE) and batch.coords is None
    assert tuple(batch.item_mask.shape) == (2, SIZE // 32, SIZE // 32) and batch.item_mask.dtype == torch.bool
    sid = cohort.samples()[0].slide_ids[0]
    img = load_slide_image(cohort_dir / "images" / f"{sid}.npy")
    ref = normalize_images(torch.from_numpy(np.array(img.pixels)).permute(2, 0, 1)[None])
    torch.testing.assert_close(batch.x[0], ref[0])
    assert torch.equal(batch.item_mask[0], torch.from_numpy(img.token_mask))
    with pytest.raises(CohortError, match="--size 512"):
        ImageCohort(cohort_dir / "labels.csv", cohort_dir / "images", input_size=512)
    labels = pd.read_csv(cohort_dir / "labels.csv")
    extra = cohort_dir / "extra.csv"
    pd.concat([labels, labels.iloc[:1].assign(slide_id="ghost")]).to_csv(extra, index=False)
    with pytest.raises(CohortError, match="ghost"):
        ImageCohort(extra, cohort_dir / "images")
    two = cohort_dir / "two.csv"
    labels.assign(case_id="c" + labels["label"].astype(str)).to_csv(two, index=False)  # 2 cases
    with pytest.raises(CohortError, match="one slide image per sample"):
        ImageBagDataset(
            ImageCohort(two, cohort_dir / "images"), ImageCohort(two, cohort_dir / "images").samples(True)
        )


def test_pretrain_finetune_heatmap_end_to_end(cohort_dir: Path, tmp_path: Path, capsys) -> None:
    pre = tmp_path / "pre"
    assert main(["pretrain", "longvit", str(cohort_dir / "images"), "--out", str(pre), "--epochs", "1",
                 "--batch-size", "2", "--global-size", "128", "--local-size", "64", "--local-crops", "1",
                 "--out-dim", "32", "--head-hidden-dim", "16", "--head-bottleneck-dim", "8",
                 "--model-arg", "depth=1", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=4",
                 "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    ckpt = pre / "checkpoint.pth"
    out = tmp_path / "run"
    argv = ["train", "--slide-images", str(cohort_dir / "images"), "--labels", str(cohort_dir / "labels.csv"),
            "--model", "longvit", "--input-size", str(SIZE), "--folds", "2", "--epochs", "2",
            *MODEL_SETS, "--set", f"model_kwargs.weights={ckpt}", "--set", "bootstrap=10", "--set", "lr=0.001",
            "--save-embeddings", "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "auc" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["n_predictions"] == 6 and "auc" in results["metrics"]
    assert len(pd.read_csv(out / "predictions.csv")) == 6
    assert (out / "embeddings" / "out_of_fold.h5").is_file()  # slide embeddings of the image model
    saved = torch.load(out / "checkpoints" / "fold0.pt", map_location="cpu", weights_only=True)
    assert saved["model"] == "longvit" and saved["in_dim"] == 3 and saved["model_kwargs"]["img_size"] == SIZE
    # finetuning started from the pretrained teacher: its patch embedding was loaded (then trained)
    from gigaslide.models.slide import create_slide_model

    start = create_slide_model(
        "longvit", 3, 2, img_size=SIZE, depth=1, embed_dim=32, num_heads=4, weights=str(ckpt)
    )
    teacher = torch.load(ckpt, map_location="cpu", weights_only=True)["teacher"]
    assert torch.equal(
        start.state_dict()["patch_embed.proj.weight"], teacher["backbone.patch_embed.proj.weight"]
    )
    assert main(argv) == 0  # rerun resumes: every fold skipped

    # feature model on images / image model on features: refused with the fix
    bad = [*argv[:5], "--model", "abmil", *argv[7:]]
    bad[bad.index("--out") + 1] = str(tmp_path / "bad")
    assert main(bad) != 0 and "--slide-images" in capsys.readouterr().err

    labels = pd.read_csv(cohort_dir / "labels.csv")
    sid, slide = labels["slide_id"][0], labels["path"][0]
    png = tmp_path / "heat.png"
    assert main(["heatmap", "--slide", slide, "--scores", str(cohort_dir / "images" / f"{sid}.npy"),
                 "--model", str(out / "checkpoints" / "fold0.pt"), "--out", str(png), "--max-size", "256"]) == 0  # fmt: skip
    assert Image.open(png).size == (256, 256)
    other = labels["path"][1]
    assert main(["heatmap", "--slide", other, "--scores", str(cohort_dir / "images" / f"{sid}.npy"),
                 "--model", str(out / "checkpoints" / "fold0.pt"), "--out", str(png)]) != 0  # fmt: skip
    assert "holds scores of slide" in capsys.readouterr().err
