"""Supervised head-only ceiling: how far the early heads get when trained with LABELS.

``specialize run`` adapts the early exit heads (backbone, gates and final head frozen) on an
unlabelled stream; ``benchmarks/specialization.py`` reports the share of the oracle's FLOPs
saving it reaches. This benchmark asks the same question of a supervised reference: the same
frozen backbone, only the early heads change, but they are trained on true labels.

For every (scenario, seed) it builds the run config of ``configs/scenarios/<scenario>.yaml``
with ``seed=<seed>`` (as ``specialize run`` does), loads the model (``--checkpoint``, else the
run config's: the cached default model) and builds the stream, for its input transform, its
classes and its held-out ``eval_in`` set (a part of the test split). The labelled training
set is the first N images of the stream's classes of the Fashion-MNIST TRAIN split (never the
test split: it is the stream's pool) after a shuffle seeded with the seed, so their class mix
is the train split's, not the stream's; the N = 3000 set is a prefix of the N = 8000 one.
``--labels pool`` instead labels the stream's own pool: the unique images the stream shows
(the Tiny-ImageNet protocol's ceiling, ``benchmarks/tiny_imagenet.py``).
Every early head's parameter-free prefix (pool + flatten, the part the updater precomputes) runs
once on those images; then a copy of the model has the rest of each early head (initialised
from the original) trained with Adam (``--lr``, ``--epochs``, batch ``--batch-size``) on
cross-entropy with the true labels. The final head is never touched.

Columns, on the held-out eval_in of the stream (one ``exit_pass`` of every exit, with the run
config's confidence measure, for the original model and for the copy):

* ``exit k acc``: accuracy (%) of early exit k, original heads -> supervised heads;
* ``gap_closed``: ``curves.iso_accuracy`` of the before curve (original heads) vs the curve
  with the supervised heads, with the oracle of the original model, at the before curve's
  peak accuracy minus ``evaluation.iso_drop`` (0.5 pt, like the runs): (before - after) /
  (before - oracle) mean FLOPs, the share of the oracle's saving the labels buy. It can exceed
  1: better heads change the exits' answers, while the oracle is the original model's;
* ``flops_ratio``: after / before mean FLOPs at that accuracy;
* ``before-oracle MFLOPs``: the denominator of gap_closed (tiny for footwear, so its
  gap_closed is noisy);
* ``after at exit-0 floor``: in how many seeds the supervised curve reaches the target with
  exit 0 answering every sample, the cheapest point any head-only change can reach: there
  gap_closed is capped and no longer grows with N (tshirt-vs-shirt: supervised exit 0 beats
  the final exit).

One row per (scenario, labelled samples): ``mean ± std (n)`` over seeds (sample std; ``n/N``
when only n of N seeds defined the value); the accuracies are means over seeds. FLOPs count a
multiply-add as 2.

Usage:
    python benchmarks/head_ceiling.py [--scenarios tops,footwear,tshirt-vs-shirt]
        [--samples 3000,8000 | --labels pool] [--seeds 0] [--checkpoint PATH] [--epochs 30]
        [--lr 1e-3]
        [--batch-size 128] [--json] [--save FILE] [--no-progress]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

DEFAULT_SCENARIOS = ("tops", "footwear", "tshirt-vs-shirt")
# (record key, column header, number format)
COLUMNS = (
    ("gap_closed", "gap_closed", ".2f"),
    ("flops_ratio", "flops_ratio", ".3f"),
    ("gap_mflops", "before-oracle MFLOPs", ".2f"),
)


def _specialization() -> ModuleType:
    """benchmarks/specialization.py, for its aggregation helpers (benchmarks is no package)."""
    name = "benchmark_specialization"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).resolve().with_name("specialization.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


# -- argument parsing ----------------------------------------------------------------------

def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(option: str, low: int, example: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in _csv(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{option} {text!r}: expected integers, e.g. {example}") from None
        if not values or min(values) < low:
            raise argparse.ArgumentTypeError(f"{option} {text!r}: expected integers >= {low}")
        return list(dict.fromkeys(values))
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", type=_csv, default=list(DEFAULT_SCENARIOS),
                        help="comma-separated scenario files or names in configs/scenarios")
    parser.add_argument("--samples", type=_ints("--samples", 1, "3000,8000"),
                        default=[3000, 8000], help="labelled training samples (one row each)")
    parser.add_argument("--labels", choices=("train", "pool"), default="train",
                        help="where the labelled samples come from: the train split (the "
                             "default) or the stream's own pool (the unique samples the stream "
                             "shows, with their true labels; --samples is then ignored)")
    parser.add_argument("--seeds", type=_ints("--seeds", 0, "0,1,2"), default=[0],
                        help="scenario seed and torch seed, e.g. 0,1,2")
    parser.add_argument("--checkpoint", default=None,
                        help="model checkpoint (default: the run config's, i.e. the cached "
                             "default model)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--save", default=None, help="also write the JSON object to this file")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
        parser.error("--epochs and --batch-size must be >= 1 and --lr > 0")
    return args


# -- data and features ---------------------------------------------------------------------

def run_config(scenario: str, seed: int, checkpoint: str | None = None):
    """The run config ``specialize run <scenario> seed=<seed>`` would use.

    Args:
        scenario: A scenario or run config file, or a name in configs/scenarios.
        seed: The scenario seed (held-out split, class sequence, sample draw).
        checkpoint: Model checkpoint replacing the config's (``None``: keep it).

    Returns:
        The ``specialize.run.RunConfig``.
    """
    from specialize.run import load_run_config

    config = load_run_config(scenario, [f"seed={seed}", "progress=false"])
    if checkpoint is not None:
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, checkpoint=str(checkpoint)))
    return config


def labelled_training_set(stream, count: int, seed: int):
    """The first ``count`` train-split samples of the stream's classes after a seeded shuffle.

    Args:
        stream: A ``streams.replay.Stream`` whose pool is not the train split.
        count: Number of labelled samples.
        seed: Seeds the shuffle.

    Returns:
        An ``ArrayDataset`` of ``count`` samples.

    Raises:
        ValueError: The stream's pool is the train split, or it has fewer than ``count``
            samples of the stream's classes.
    """
    from streams.datasets import load_dataset

    scenario = stream.config
    if scenario.split == "train":
        raise ValueError(f"scenario {stream.name!r} draws its stream from the train split; the "
                         "labelled samples must come from a split the stream never sees")
    data = load_dataset(scenario.dataset, split="train", root=scenario.root,
                        **scenario.dataset_options)
    keep = torch.isin(data.labels, torch.as_tensor(list(stream.classes), dtype=data.labels.dtype))
    candidates = torch.nonzero(keep).flatten()
    if len(candidates) < count:
        raise ValueError(f"the train split has {len(candidates)} samples of classes "
                         f"{list(stream.classes)}, fewer than --samples {count}")
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    return data.subset(candidates[order[:count]].numpy(), name=f"{data.name}:labelled")


def stream_pool_set(stream):
    """The unique samples the stream shows (first appearance order), with their true labels.

    This is the Tiny-ImageNet protocol's supervised ceiling: the early heads learn from
    exactly the images the unsupervised run sees, but labelled.
    """
    from streams.datasets import ArrayDataset

    evaluator = stream.evaluator()
    indices = evaluator.indices.numpy()
    _, first = np.unique(indices, return_index=True)
    positions = np.sort(first)
    images = stream.raw_images()[torch.from_numpy(positions)]
    return ArrayDataset(images=images, labels=evaluator.labels[torch.from_numpy(positions)],
                        class_names=stream.class_names, mean=stream.transform.mean,
                        std=stream.transform.std, name=f"{stream.name}:pool")


def head_splits(model: nn.Module) -> list[int]:
    """Per early head: how many leading layers are parameter-free (precomputed, not trained)."""
    # A private helper of the updater, imported on purpose: the ceiling must split the heads
    # exactly where the online updater does.
    from backbones.heads import precomputed_prefix

    return [precomputed_prefix(head) for head in list(model.heads)[:-1]]


@torch.no_grad()
def early_head_inputs(model: nn.Module, images: Tensor, transform, batch_size: int = 256,
                      progress: bool = False) -> list[Tensor]:
    """Every early head's input after its parameter-free prefix (what its trained part reads).

    Args:
        model: A multi-exit model (put in eval mode).
        images: uint8 images ``(N, C, H, W)``.
        transform: Callable turning a uint8 batch into model inputs.
        batch_size: Forward batch size.
        progress: Show a progress bar.

    Returns:
        One ``(N, ...)`` tensor per early exit.
    """
    model.eval()
    splits = head_splits(model)
    parts: list[list[Tensor]] = [[] for _ in splits]
    last_early = model.num_exits - 2
    for start in tqdm(range(0, len(images), batch_size), desc="features", unit="batch",
                      disable=not progress, leave=False, file=sys.stderr):
        out = model.forward_exits(transform(images[start:start + batch_size]), last_early)
        for k, split in enumerate(splits):
            features = out.features[k]
            parts[k].append(model.heads[k][:split](features) if split else features)
    return [torch.cat(part) for part in parts]


# -- supervised head training --------------------------------------------------------------

def train_early_heads(model: nn.Module, inputs: Sequence[Tensor], labels: Tensor, *,
                      epochs: int = 30, lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
                      progress: bool = False) -> tuple[nn.Module, list[list[float]]]:
    """Train a copy of the model's early heads with cross-entropy on true labels.

    The model is deep-copied; in the copy, the part of each early head after its
    parameter-free prefix (see :func:`head_splits`) is trained with Adam, starting from the
    original weights. The backbone, the gates and the final head of the copy keep their
    weights, and ``model`` itself is never modified.

    Args:
        model: A multi-exit model with at least two exits.
        inputs: Per early head, the prefix outputs of the training samples
            (:func:`early_head_inputs`).
        labels: int64 ``(N,)`` true classes.
        epochs: Passes over the training samples.
        lr: Adam learning rate.
        batch_size: Training batch size.
        seed: Seeds the batch order.
        progress: Show a progress bar over the epochs of each head.

    Returns:
        ``(copy, losses)``: the copy in eval mode with no parameter requiring grad, and per
        early head the mean training loss of every epoch.

    Raises:
        ValueError: The model has no early head, or ``inputs`` do not match the heads.
    """
    if model.num_exits < 2:
        raise ValueError("the model has a single exit: no early head to train")
    splits = head_splits(model)
    if len(inputs) != len(splits) or any(len(x) != len(labels) for x in inputs):
        raise ValueError(f"expected {len(splits)} input tensors of {len(labels)} rows, got "
                         f"{[len(x) for x in inputs]}")
    trained = copy.deepcopy(model).eval()
    trained.requires_grad_(False)
    labels = labels.long()
    losses: list[list[float]] = []
    with torch.inference_mode(False), torch.enable_grad():
        for k, split in enumerate(splits):
            head = trained.heads[k]
            body = head[split:] if split else head  # shares its modules with the head
            params = list(body.parameters())
            for param in params:
                param.requires_grad_(True)
            optimizer = torch.optim.Adam(params, lr=lr)
            generator = torch.Generator().manual_seed(seed)
            features = inputs[k]
            history = []
            for _ in tqdm(range(epochs), desc=f"head {k}", unit="epoch", disable=not progress,
                          leave=False, file=sys.stderr):
                order = torch.randperm(len(labels), generator=generator)
                total = 0.0
                for start in range(0, len(labels), batch_size):
                    batch = order[start:start + batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(body(features[batch]), labels[batch])
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(batch)
                history.append(total / len(labels))
            for param in params:
                param.requires_grad_(False)
                param.grad = None
            losses.append(history)
    return trained, losses


# -- one (scenario, seed) ------------------------------------------------------------------

def _front(result):
    from specialize.evaluation import curves

    return curves.pareto_front(curves.sweep(result.confidence.numpy(), result.correct.numpy(),
                                            result.flops.numpy()))


def ceiling_figures(before, after, drop: float) -> dict[str, Any]:
    """Exit accuracies and the iso-accuracy comparison of two ``ExitPass`` of the same set.

    Args:
        before: Exit pass of the original model.
        after: Exit pass of the model with the supervised heads.
        drop: Iso-accuracy target: the before curve's peak minus this many points.

    Returns:
        ``acc_before``/``acc_after`` (% per exit), the iso-accuracy figures (``gap_closed``,
        ``flops_ratio``, ``gap_mflops`` and the FLOPs at the target), ``flops_floor`` (mean
        FLOPs when exit 0 answers everything, the least any head-only change can cost) and
        ``at_floor`` (whether the supervised curve reaches the target there: then
        ``flops_after`` no longer depends on how good the heads are).
    """
    from specialize.evaluation import curves

    num = _specialization()._num  # finite float or None, as the other benchmark records
    oracle = curves.oracle_curve(before.correct.numpy(), before.flops.numpy())
    iso = curves.iso_accuracy(_front(before), _front(after), oracle, drop=drop)
    floor = float(after.flops[:, 0].double().mean())  # every sample answered at exit 0
    return {
        "acc_before": (100.0 * before.correct.double().mean(0)).tolist(),
        "acc_after": (100.0 * after.correct.double().mean(0)).tolist(),
        "gap_closed": num(iso["gap_closed"]),
        "flops_ratio": num(iso["flops_ratio"]),
        "target_accuracy": num(iso["target_accuracy"]),
        "flops_before": num(iso["flops_before"]),
        "flops_after": num(iso["flops_after"]),
        "flops_oracle": num(iso["flops_oracle"]),
        "gap_mflops": num((iso["flops_before"] - iso["flops_oracle"]) / 1e6),
        "flops_floor": floor,
        "at_floor": iso["flops_after"] <= floor * (1 + 1e-9),
    }


def run_scenario(scenario: str, seed: int, samples: Sequence[int], args: argparse.Namespace,
                 progress: bool = False, models: dict | None = None) -> list[dict[str, Any]]:
    """The ceiling on one scenario and seed, one record per number of labelled samples.

    Args:
        scenario: Scenario file or name.
        seed: Scenario seed and torch seed.
        samples: Labelled sample counts (each trains its own heads).
        args: ``epochs``, ``lr``, ``batch_size`` and ``checkpoint``.
        progress: Show progress bars.
        models: Cache of loaded models by model config (filled in).

    Returns:
        The records, in ``samples`` order.
    """
    from specialize.evaluation.passes import exit_pass
    from specialize.run import build_run_stream, load_model

    torch.manual_seed(seed)
    config = run_config(scenario, seed, args.checkpoint)
    models = {} if models is None else models
    key = (config.model.checkpoint, config.model.train_config)
    if key not in models:
        models[key] = load_model(config.model, dataset=config.dataset, progress=progress)
    model, checkpoint = models[key]
    stream = build_run_stream(config, model)
    if stream.eval_in is None:
        raise ValueError(f"scenario {scenario!r} holds nothing out (holdout_fraction 0)")
    eval_in = stream.eval_in

    def evaluate(net: nn.Module):
        return exit_pass(net, eval_in.images, eval_in.labels, stream.transform,
                         measure=config.policy.measure, batch_size=config.evaluation.batch_size)

    before = evaluate(model)
    if getattr(args, "labels", "train") == "pool":
        train = stream_pool_set(stream)
        samples = [len(train)]
    else:
        train = labelled_training_set(stream, max(samples), seed)
    inputs = early_head_inputs(model, train.images, stream.transform,
                               config.evaluation.batch_size, progress)
    records = []
    for count in samples:
        clock = time.perf_counter()
        trained, losses = train_early_heads(
            model, [x[:count] for x in inputs], train.labels[:count], epochs=args.epochs,
            lr=args.lr, batch_size=args.batch_size, seed=seed, progress=progress)
        figures = ceiling_figures(before, evaluate(trained), config.evaluation.iso_drop)
        records.append({
            "scenario": _specialization().scenario_label(scenario), "seed": seed,
            "samples": count, **figures,
            "train_loss_first_epoch": [h[0] for h in losses],
            "train_loss_last_epoch": [h[-1] for h in losses],
            "train_class_counts": torch.bincount(train.labels[:count],
                                                 minlength=stream.num_classes).tolist(),
            "classes": list(stream.classes), "eval_in": len(eval_in),
            "measure": config.policy.measure, "iso_drop": config.evaluation.iso_drop,
            "checkpoint": checkpoint, "fingerprint": stream.fingerprint,
            "seconds": time.perf_counter() - clock,
        })
    return records


# -- aggregation and output ----------------------------------------------------------------

def table_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, labelled samples), in first-seen order, aggregated over seeds."""
    aggregate = _specialization().aggregate
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["scenario"], record["samples"]), []).append(record)
    rows = []
    for (scenario, samples), group in groups.items():
        exits = len(group[0]["acc_before"])
        metrics = {key: aggregate([r.get(key) for r in group]) for key, _, _ in COLUMNS}
        accuracy = {phase: [aggregate([r[f"acc_{phase}"][k] for r in group])
                            for k in range(exits)] for phase in ("before", "after")}
        rows.append({"scenario": scenario, "samples": samples,
                     "seeds": [r["seed"] for r in group], "metrics": metrics,
                     "accuracy": accuracy,
                     "at_floor": sum(bool(r.get("at_floor")) for r in group)})
    return rows


def _accuracy_cell(before: dict[str, Any], after: dict[str, Any]) -> str:
    if before["mean"] is None or after["mean"] is None:
        return "n/a"
    return f"{before['mean']:.1f} → {after['mean']:.1f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of the aggregated rows (early exits only for accuracies)."""
    format_cell = _specialization().format_cell
    early = max((len(row["accuracy"]["before"]) - 1 for row in rows), default=0)
    header = ["scenario", "labelled", *(f"exit {k} acc" for k in range(early)),
              *(title for _, title, _ in COLUMNS), "after at exit-0 floor"]
    lines = []
    for row in rows:
        acc = row["accuracy"]
        cells = [_accuracy_cell(acc["before"][k], acc["after"][k])
                 if k < len(acc["before"]) - 1 else "" for k in range(early)]
        lines.append([row["scenario"], str(row["samples"]), *cells,
                      *(format_cell(row["metrics"][key], fmt, None) for key, _, fmt in COLUMNS),
                      f"{row['at_floor']}/{len(row['seeds'])}"])
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in [header, *lines])


def build_report(command: str, args: argparse.Namespace,
                 records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The whole result as one JSON-ready dict (the table's rows and every record)."""
    return {
        "command": command,
        "settings": {"scenarios": list(args.scenarios), "samples": list(args.samples),
                     "seeds": list(args.seeds), "epochs": args.epochs, "lr": args.lr,
                     "batch_size": args.batch_size, "optimizer": "adam",
                     "checkpoints": sorted({r["checkpoint"] for r in records}),
                     "measures": sorted({r["measure"] for r in records}),
                     "iso_drops": sorted({r["iso_drop"] for r in records})},
        "table": table_rows(records),
        "runs": list(records),
    }


def format_report(report: dict[str, Any]) -> str:
    """The printed output: command, settings, the table and its legend."""
    settings = report["settings"]
    lines = [f"command: {report['command']}",
             f"model: {', '.join(settings['checkpoints']) or '?'}; seeds "
             f"{','.join(map(str, settings['seeds']))}; FLOPs: a multiply-add counts 2",
             f"supervised early heads: Adam lr {settings['lr']:g}, {settings['epochs']} epochs, "
             f"batch {settings['batch_size']}, cross-entropy on true labels of train-split "
             "samples of the stream's classes; backbone, gates and final head unchanged",
             "", format_table(report["table"]), "",
             "exit k acc: held-out eval_in accuracy (%) of early exit k, original -> supervised "
             "heads (mean over seeds)",
             f"gap_closed, flops_ratio: iso-accuracy at the before curve's peak - "
             f"{'/'.join(f'{d:g}' for d in settings['iso_drops'])} pt "
             f"({'/'.join(settings['measures'])}), oracle of the original model; "
             "before-oracle MFLOPs: gap_closed's denominator; after at exit-0 floor: seeds "
             "whose supervised curve reaches the target with exit 0 answering everything (the "
             "cheapest head-only point: gap_closed is then capped, the same for every N)",
             "mean ± std over seeds (n seeds; n/N: defined in n of N seeds)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(1)
    progress = not args.no_progress
    command = shlex.join(["python", "benchmarks/head_ceiling.py", *argv])
    jobs = [(scenario, seed) for scenario in args.scenarios for seed in args.seeds]
    records: list[dict[str, Any]] = []
    models: dict = {}
    for scenario, seed in tqdm(jobs, desc="scenario x seed", unit="run", disable=not progress,
                               file=sys.stderr):
        records += run_scenario(scenario, seed, args.samples, args, progress, models)
    report = build_report(command, args, records)
    from specialize.report import to_jsonable

    text = json.dumps(to_jsonable(report), indent=2)
    if args.save:
        Path(args.save).write_text(text + "\n")
    print(text if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
