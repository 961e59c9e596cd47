"""`gigaslide train`: cross-validated slide-level training on tile features.

Evaluation protocol: case-grouped stratified k-fold (``--folds``), Monte Carlo repeated random splits
(``--monte-carlo R --test-fraction F``), or CLAM split files (``--splits DIR``). A validation set
(``--val-fraction``; never left empty by rounding on small cohorts) selects the checkpoint.

Configuration precedence: defaults < ``--config YAML`` < explicit flags < ``--set key=value``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from gigaslide.cli.common import SPLIT_DEFAULTS, add_split_arguments, add_wait_argument, output_folder

log = logging.getLogger("gigaslide.train")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from gigaslide.train.config import TrainConfig

    d = TrainConfig()  # flags default to None (a --config file may set them); help shows these defaults
    p = sub.add_parser(
        "train",
        help="cross-validated slide-level training (classification or survival) on tile features",
        description="Train a slide model with case-grouped k-fold or Monte Carlo cross-validation and "
        "write a report.",
    )
    p.add_argument(
        "--features", type=Path, required=True, help="features folder (h5_files/<slide_id>.h5 or *.h5/*.pt)"
    )
    p.add_argument("--labels", type=Path, required=True, help="CSV: slide_id, case_id, label | time, event")
    p.add_argument("--out", type=Path, required=True, help="output folder (reruns resume finished folds)")
    p.add_argument(
        "--model", default=None, help=f"slide model name, see `gigaslide models` (default: {d.model})"
    )
    p.add_argument(
        "--task", choices=["classification", "survival"], default=None, help=f"(default: {d.task})"
    )
    p.add_argument(
        "--label-col", default="label", help="column of --labels holding the class (classification)"
    )
    add_split_arguments(p, defaults={k: getattr(d, k) for k in SPLIT_DEFAULTS}, unset=True)
    p.add_argument(
        "--case-level", action="store_true", default=None, help="one bag per case (all its slides)"
    )
    p.add_argument("--classes", nargs="+", default=None, help="ordered class names; other labels are errors")
    p.add_argument("--config", type=Path, default=None, help="YAML file of training config keys")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set lr=1e-4 --set max_tiles=4096",
    )
    p.add_argument(
        "--list-keys",
        action=_ListKeys,
        help="list every config key (for --config and --set) with its type and default, and exit",
    )
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs per fold (default: {d.epochs})")
    p.add_argument("--seed", type=int, default=None, help=f"random seed (default: {d.seed})")
    p.add_argument(
        "--cache",
        choices=["memory", "lazy", "mmap"],
        default=None,
        help=f"feature loading: all in memory, read per bag, or memory-mapped (default: {d.cache})",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--save-embeddings",
        action="store_true",
        help="also write each fold's test slide embeddings to OUT/embeddings/ (readable by `gigaslide probe`)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar over folds")
    p.add_argument(
        "--allow-mixed-features",
        action="store_true",
        help="use feature files from different encoders/weights anyway (refused by default)",
    )
    add_wait_argument(p)
    return p


class _ListKeys(argparse.Action):
    """``--list-keys``: print the config keys and exit (like ``--version``, no other argument needed)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        kwargs.pop("default", None)
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, *_: object, **__: object) -> None:
        from gigaslide.train.config import describe_keys

        print(describe_keys())
        parser.exit(0)


def build_config(args: argparse.Namespace):  # -> TrainConfig
    """Merge defaults, YAML, explicit flags and ``--set`` overrides."""
    from gigaslide.train.config import TrainConfig, apply_overrides, config_from_dict, load_config

    cfg = load_config(args.config) if args.config else TrainConfig()
    flags = {
        "model": args.model,
        "task": args.task,
        "folds": args.folds,
        "monte_carlo": args.monte_carlo,
        "test_fraction": args.test_fraction,
        "val_fraction": args.val_fraction,
        "train_fraction": args.train_fraction,
        "few_shot": args.few_shot,
        "case_level": args.case_level,
        "classes": args.classes,
        "epochs": args.epochs,
        "seed": args.seed,
        "cache": args.cache,
    }
    cfg = config_from_dict({k: v for k, v in flags.items() if v is not None}, base=cfg, source="command line")
    return apply_overrides(cfg, args.overrides)


def run(args: argparse.Namespace) -> int:
    from gigaslide.data.cohort import Cohort
    from gigaslide.eval.reports import FOLD_CI_METHOD, format_metric_table
    from gigaslide.experiments.crossval import run_crossval, split_description
    from gigaslide.utils.device import resolve_device

    cfg = build_config(args)
    device = resolve_device(args.device)
    with output_folder(args.out, wait=args.wait):
        cohort = Cohort(
            args.labels, args.features, task=cfg.task, classes=cfg.classes, cache=cfg.cache,
            label_col=args.label_col, allow_mixed_features=args.allow_mixed_features,
        )  # fmt: skip
        log.info("%s; model %s on %s", cohort, cfg.model, device)
        result = run_crossval(
            cohort, cfg.model, cfg.task, cfg, args.out, device=device, splits_dir=args.splits,
            save_embeddings=args.save_embeddings,
            progress=not args.no_progress,
        )  # fmt: skip
    if result.skipped_folds:
        log.info("resumed: folds %s were already finished", result.skipped_folds)
    doc = json.loads(result.report["results"].read_text())
    n_pred = doc["n_predictions"]
    warned = [r["fold"] for r in result.per_fold if r.get("val_warning")]
    protocol = split_description(cfg, len(result.per_fold), args.splits)
    lines = [
        f"{cfg.model} {cfg.task}, {protocol} -> {result.out_dir}",
        format_metric_table(doc["metrics"], doc["pooled"]),
        f"  fold columns: per-fold test metrics, {FOLD_CI_METHOD}",
        f"  pooled columns: metric on all {n_pred} pooled out-of-fold test predictions, "
        + next((p["ci_method"] for p in doc["pooled"].values()), "bootstrap CI undefined"),
    ]
    if result.embeddings:
        lines.append(f"  slide embeddings: {', '.join(str(p) for p in result.embeddings)}")
    if warned:
        lines.append(
            f"  warning: folds {warned} had an unusable validation set (see val_warning in per_fold.csv)"
        )
    print("\n".join(lines))
    return 0
