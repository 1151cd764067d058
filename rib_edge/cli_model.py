"""``rib-edge train``, ``eval``, ``case-study`` and ``bench accuracy``: thin wrappers around model/.

rib_edge/cli.py registers them. torch and pandas are imported inside the commands so ``rib-edge --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from rib_edge.cli_common import (
    BadInput,
    DatasetChoice,
    FiniteFloatRange,
    check_checkpoint_data,
    dataset_options,
    echo_step,
    load_checkpoint_or_fail,
    seed_option,
    warn_small_test,
)

DATA_TYPE_NAMES = ("SKU", "SKU+Activity", "SKU+Dwell", "SKU+Micro")


@click.command("train")
@dataset_options()
@click.option(
    "--data-type",
    type=click.Choice(DATA_TYPE_NAMES),
    default="SKU+Micro",
    show_default=True,
    help="Which tuple fields the model sees (paper Section 5.1).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for the checkpoint rib.pt and history.json.",
)
@click.option(
    "--loss",
    type=click.Choice(["softmax", "paper", "sampled"]),
    default="softmax",
    show_default=True,
    help="sampled: sampled softmax in training (big catalogues), full-catalogue scores at eval.",
)
@click.option(
    "--copy/--no-copy",
    "copy_term",
    default=None,
    help="Copy/repeat term [default: on, except with the paper loss].",
)
@click.option(
    "--no-attention", is_flag=True, help="RIB-Attention: last hidden state instead of attention pooling."
)
@seed_option
@click.option("--item-dim", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--hidden-dim", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=5e-3, show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch CPU threads."
)
@click.option("--device", default=None, help="auto, cpu or cuda (env RIB_EDGE_DEVICE overrides).")
@click.option(
    "--item-catalog",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Catalog CSV (item_id + category/brand columns; `rib-edge data catalog`): item init from it instead of Word2vec.",
)
@click.option(
    "--tie-output",
    is_flag=True,
    help="Score items against the item embeddings (one nn.Module, no separate output table).",
)
@click.option(
    "--freeze-items",
    is_flag=True,
    help="Keep the item embeddings at their init (Word2vec or catalog); with --tie-output "
    "this is what bench accuracy chose on validation for catalogues up to 10k items.",
)
@click.option(
    "--refit-on-all",
    is_flag=True,
    help="After early stopping, retrain the best epoch count on every training session "
    "(validation included: the most recent sessions).",
)
def train_command(
    data: DatasetChoice,
    data_type: str,
    epochs: int,
    out_dir: Path,
    loss: str,
    copy_term: bool | None,
    no_attention: bool,
    seed: int,
    item_dim: int,
    hidden_dim: int,
    batch_size: int,
    lr: float,
    threads: int,
    device: str | None,
    item_catalog: Path | None,
    tie_output: bool,
    freeze_items: bool,
    refit_on_all: bool,
) -> None:
    """Train RIB on a dataset's training split (validation = end of the training period)."""
    from model.catalog import CatalogError, catalog_file_vectors
    from model.train import TrainConfig, rib_config_for, train_rib

    split = data.open()
    train = split.train
    if data_type in ("SKU+Activity", "SKU+Micro") and not train.has_activity:
        click.echo(f"note: {data.name} has no activity field; the activity embedding sees one constant value")
    if data_type in ("SKU+Dwell", "SKU+Micro") and not train.has_dwell:
        click.echo(f"note: {data.name} has no dwell time; the dwell embedding sees only 'unknown'")
    try:
        rib_config = rib_config_for(
            train,
            data_type,
            item_dim=item_dim,
            hidden_dim=hidden_dim,
            loss=loss,
            use_attention=not no_attention,
            copy=copy_term,
            tie_output=tie_output,
            freeze_items=freeze_items,
        )
    except ValueError as err:  # e.g. --tie-output with the paper loss
        raise BadInput(str(err)) from err
    train_config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        num_threads=threads,
        checkpoint_dir=str(out_dir),
        device=device,
        refit_on_all=refit_on_all,
    )
    item_vectors = None
    if item_catalog is not None:
        try:
            item_vectors = catalog_file_vectors(item_catalog, train.vocab.item_ids, item_dim, seed)
        except CatalogError as err:
            raise BadInput(str(err)) from err
        covered = int(item_vectors.present[1:].sum())
        echo_step(f"item init from {item_catalog}: {covered} of {train.n_items} items")
    echo_step(
        f"training {'RIB-Attention' if no_attention else 'RIB'} ({data_type}, {loss} loss) on {train.n_sessions} sessions"
    )
    try:
        rec, history = train_rib(train, rib_config, train_config, progress=True, item_vectors=item_vectors)
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    (out_dir / "history.json").write_text(json.dumps(rec.checkpoint()["history"], indent=2))
    best = history.get("best_val_recall@20")
    refit = history.get("refit")
    echo_step(
        f"best epoch {history['best_epoch']}"
        + (
            f" (refit skipped: {refit['skipped']})"
            if refit and "skipped" in refit
            else f" (refit {refit['epochs']} epochs on all {refit['n_fit_sessions']} training sessions)"
            if refit
            else ""
        )
        + (f", validation recall@20 {best:.4f}" if best is not None else "")
        + f"; {history['sessions_per_s']:.0f} sessions/s, {history['total_seconds']:.1f}s, peak RSS {history['peak_rss_mb']:.0f} MB"
    )
    click.echo(f"checkpoint: {out_dir / 'rib.pt'}")


@click.command("eval")
@dataset_options()
@click.option(
    "--checkpoint",
    "checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="rib.pt written by `rib-edge train`.",
)
@click.option("--device", default=None, help="auto, cpu or cuda (env RIB_EDGE_DEVICE overrides).")
def eval_command(data: DatasetChoice, checkpoint: Path, device: str | None) -> None:
    """Evaluate a RIB checkpoint on a dataset's test split: Recall@20 and MRR@20 with 95% bootstrap CIs.

    The dataset (with its --mapping and split settings) must give the vocabularies the checkpoint was
    trained with; another one is refused.
    """
    from experiments.benchmark import small_test
    from model.evaluate import evaluate

    rec = load_checkpoint_or_fail(checkpoint, device=device)
    split = data.open()
    check_checkpoint_data(rec, split, data.name)
    result = evaluate(rec, split.test)
    click.echo(
        f"{rec.name} ({rec.rib_config.data_type}, {rec.rib_config.loss} loss) on {data.name} test: {result.n_examples} examples"
    )
    row = {}
    for metric in ("recall@20", "mrr@20"):
        low, high = result.bootstrap_ci(metric)
        row[f"{metric}_ci95"] = [low, high]
        click.echo(f"{metric}: {result.metrics[metric]:.4f}  95% CI [{low:.4f}, {high:.4f}]")
    warn_small_test(small_test(result.n_examples, [row]))


def _split_csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.command("accuracy")
@dataset_options()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory [default: benchmarks/results/accuracy/<dataset>].",
)
@click.option(
    "--models",
    default=None,
    help="Comma-separated subset of: POP,BPR-MF,Item-KNN,SR,S-KNN,V-SKNN,STAN,Word2vec,Word2vec-Avg,RIB-Attention,RIB.",
)
@click.option(
    "--data-types",
    default=None,
    help="Comma-separated subset of RIB data types: SKU,SKU+Activity,SKU+Dwell,SKU+Micro.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Max RIB epochs (early stopping on validation Recall@20).",
)
@click.option("--quick", is_flag=True, help="CI-sized run: tiny RIB, 2 epochs, 100 bootstrap resamples.")
@click.option(
    "--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch CPU threads for RIB."
)
@seed_option
@click.option(
    "--item-catalog",
    default=None,
    metavar="FILE|shipped",
    help="RIB's item table from a catalog CSV (`rib-edge data catalog`), or 'shipped' for the shared dataset's own, "
    "instead of Word2vec: side information the baselines lack (an extension beyond the paper).",
)
@click.option(
    "--merge",
    "merge_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Instead of running: merge accuracy runs (dirs with accuracy.json + ranks.npz) of this dataset into --out.",
)
def bench_accuracy_command(
    data: DatasetChoice,
    out_dir: Path | None,
    models: str | None,
    data_types: str | None,
    epochs: int | None,
    quick: bool,
    threads: int,
    seed: int,
    item_catalog: str | None,
    merge_dirs: tuple[Path, ...],
) -> None:
    """Paper Table 3 for one dataset: baselines, then RIB-Attention and RIB per data type (JSON + markdown)."""
    from experiments.accuracy import DATA_TYPE_NAMES as TYPES
    from experiments.accuracy import MODEL_NAMES, AccuracySettings, merge_accuracy, run_accuracy

    if merge_dirs:
        out_dir = out_dir or Path("benchmarks/results/accuracy") / data.label
        try:
            merge_accuracy(merge_dirs, out_dir)
        except (ValueError, OSError) as err:
            raise BadInput(f"--merge: {err}") from err
        click.echo(
            f"merged {len(merge_dirs)} runs into {out_dir / 'accuracy.json'} and {out_dir / 'accuracy.md'}"
        )
        return

    try:
        settings = AccuracySettings(
            models=_split_csv(models) or MODEL_NAMES,
            data_types=_split_csv(data_types) or TYPES,
            epochs=epochs,
            quick=quick,
            threads=threads,
            seed=seed,
            item_catalog=item_catalog,
        )
    except ValueError as err:
        raise BadInput(str(err)) from err
    from model.catalog import CatalogError

    if item_catalog is not None and item_catalog != "shipped" and not Path(item_catalog).is_file():
        raise BadInput(f"--item-catalog: {item_catalog} is not a file (or 'shipped')")
    split = data.open()
    out_dir = out_dir or Path("benchmarks/results/accuracy") / data.label
    try:
        payload = run_accuracy(split, data.name, out_dir, settings, progress=echo_step)
    except CatalogError as err:
        raise BadInput(str(err)) from err
    for row in payload["rows"]:
        if row.get("skipped"):
            click.echo(f"{row['model']:14s} {row['data_type']:13s} skipped: {row['skipped']}")
        else:
            click.echo(
                f"{row['model']:14s} {row['data_type']:13s} recall@20 {row['recall@20']:.4f}  mrr@20 {row['mrr@20']:.4f}"
            )
    click.echo(f"wrote {out_dir / 'accuracy.json'} and {out_dir / 'accuracy.md'}")
    warn_small_test(payload.get("small_test_reasons", []))


@click.command("case-study")
@dataset_options()
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="rib.pt of a RIB model (with attention); repeat once per data type (SKU, SKU+Activity, SKU+Dwell, SKU+Micro).",
)
@click.option(
    "--session",
    type=click.IntRange(min=0),
    default=None,
    help="Test session index [default: a 6-14 tuple session with varied activities].",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory [default: benchmarks/results/case_study/<dataset>].",
)
def case_study_command(
    data: DatasetChoice,
    checkpoints: tuple[Path, ...],
    session: int | None,
    out_dir: Path | None,
) -> None:
    """Figure-8 case study: attention weight of every tuple of one test session, per data type (text + PNG)."""
    from experiments.case_study import case_study, case_study_text, write_case_study

    recs = [load_checkpoint_or_fail(path) for path in checkpoints]
    split = data.open()
    for rec in recs:
        check_checkpoint_data(rec, split, data.name)
    try:
        study = case_study(split.test, checkpoints, session)
    except (ValueError, RuntimeError, KeyError) as err:
        raise BadInput(str(err)) from err
    out_dir = out_dir or Path("benchmarks/results/case_study") / data.label
    paths = write_case_study(study, out_dir)
    click.echo(case_study_text(study))
    click.echo(f"wrote {paths['json']}, {paths['text']} and {paths['png']}")
