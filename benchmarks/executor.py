"""Static vs masked reference vs DynamicExecutor: FLOPs ratio, speedup and efficiency.

Runs, side by side in one process on the same inputs (Fashion-MNIST test images, or with
``--dataset tiny_imagenet`` a seeded sample of Tiny-ImageNet's pool split for the cached Lite0
exits model):

* ``static``: the same architecture without gates (``gating=False``), plain module forward
  computing every exit; its cost is ``exit_info[-1]["flops"]``;
* ``static-folded``: that static model through ``DynamicExecutor`` with no early exit
  (BatchNorm folded, functional convs): the same FLOPs with the executor's engine, to separate
  what the engine gains from what skipping gains;
* ``reference``: the gated model's masked forward over every exit + ``select_exits``;
* ``executor``: ``DynamicExecutor(model).run`` (sliced at batch 1, compaction when batched;
  batches run channels_last from the stem output on).

``--channels-last`` also converts the static and reference models (the fair comparison for
the batched numbers: the plain static model cannot switch layout after its 1-channel stem).

On the Lite0 exits model (``--dataset tiny_imagenet``; no gates) ``static`` is the model's own
full forward, and ``static-folded`` its executor with no early exit (nothing is folded there:
timm stages run as they are), so the executor's gain is early exiting alone.

Repeats are interleaved (the order rotates every repeat) and the median wall time is kept.
``flops_ratio`` = static FLOPs / executor's mean accounted FLOPs, ``speedup`` = static time /
executor time, ``efficiency`` = speedup / flops_ratio. FLOPs count a multiply-add as 2.

Usage:
    python benchmarks/executor.py [--checkpoint PATH] [--threshold 0.9] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from backbones import create_backbone
from backbones.checkpoint import load_checkpoint
from backbones.executor import DynamicExecutor, reference_result
from backbones.multi_exit import MultiExitNet

RUNNERS = ("static", "static-folded", "reference", "executor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None,
                        help="gated model checkpoint (default: the cached default model if "
                             "present, else a random tiny_resnet with random gate biases)")
    parser.add_argument("--static-checkpoint", default=None,
                        help="trained ungated checkpoint for the static baseline, or 'auto' for "
                             "the cached fashion_mnist_tiny_ungated model (default: the gated "
                             "model's weights without its gates; same timing, lower accuracy)")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="confidence threshold of every early exit")
    parser.add_argument("--measure", default="max_softmax", help="confidence measure")
    parser.add_argument("--samples-batch1", type=int, default=1000)
    parser.add_argument("--samples-batched", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true",
                        help="feed every runner channels_last inputs (and models)")
    parser.add_argument("--gate-mode", default="parallel",
                        help="gate mode of the random model (no checkpoint only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None,
                        help="data folder (Fashion-MNIST; Tiny-ImageNet: the zip or folder)")
    parser.add_argument("--dataset", choices=("fashion_mnist", "tiny_imagenet"),
                        default="fashion_mnist",
                        help="tiny_imagenet: the cached Lite0 exits model on Tiny-ImageNet")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--save", default=None, help="also write the JSON object to this file")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


# -- models --------------------------------------------------------------------------------

def default_checkpoint_path(config: str | None = None) -> Path | None:
    """The cached default model (or the model of another zoo config), if it exists.

    Never trains: the benchmark falls back to a random model instead.
    """
    try:
        from specialize.models.zoo import DEFAULT_CONFIG, default_checkpoint

        path = DEFAULT_CONFIG if config is None else DEFAULT_CONFIG.with_name(config)
        return default_checkpoint(path, train_if_missing=False, progress=False)
    except (FileNotFoundError, ImportError):
        return None


def random_gated_model(gate_mode: str, seed: int) -> MultiExitNet:
    """A random tiny_resnet whose gates close about 30-50% of the blocks and channels."""
    torch.manual_seed(seed)
    model = create_backbone("tiny_resnet", num_classes=10, in_chans=1, gate_mode=gate_mode)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 1.5, generator=generator)
        for stage in model.stages:
            for block in stage:
                fc = block.gate.fc
                fc.weight.normal_(0, 0.05, generator=generator)
                fc.bias.uniform_(-0.6, 1.0, generator=generator)
    return model.eval()


def load_models(args: argparse.Namespace) -> tuple[MultiExitNet, MultiExitNet, str, str]:
    """The gated model, its static baseline, and where each came from."""
    if args.dataset == "tiny_imagenet":
        path = (Path(args.checkpoint) if args.checkpoint
                else default_checkpoint_path("tiny_imagenet_lite0.yaml"))
        if path is None:
            sys.exit("no cached Lite0 model; run `specialize train "
                     "configs/backbones/tiny_imagenet_lite0.yaml` first")
        model, _ = load_checkpoint(path)
        return model.eval(), model.eval(), str(path), "the same model, every stage and no exit"
    path = Path(args.checkpoint) if args.checkpoint else default_checkpoint_path()
    if path is not None:
        gated, _ = load_checkpoint(path)
        source = str(path)
    else:
        gated = random_gated_model(args.gate_mode, args.seed)
        source = f"random tiny_resnet ({args.gate_mode}, seed {args.seed}; no checkpoint)"
    static_path = args.static_checkpoint
    if static_path == "auto":
        static_path = default_checkpoint_path("fashion_mnist_tiny_ungated.yaml")
        if static_path is None:
            sys.exit("--static-checkpoint auto: no cached fashion_mnist_tiny_ungated model; run "
                     "`specialize train configs/backbones/fashion_mnist_tiny_ungated.yaml`")
    if static_path:
        static, _ = load_checkpoint(static_path)
        if static.gating or static.name != gated.name:
            sys.exit(f"--static-checkpoint must be an ungated {gated.name}, got "
                     f"{static.name} (gating={static.gating})")
        static_source = str(static_path)
    else:
        static = create_backbone(gated.name, **{**gated.build_args, "gating": False})
        own = static.state_dict()
        shared = {k: v for k, v in gated.state_dict().items()
                  if k in own and own[k].shape == v.shape}
        static.load_state_dict(shared, strict=False)
        static_source = f"the gated model's weights without gates ({len(shared)}/{len(own)})"
    return gated.eval(), static.eval(), source, static_source


def load_inputs(model: MultiExitNet, count: int, root: str | None, dataset: str = "fashion_mnist",
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` test images transformed for ``model``: Fashion-MNIST's first, or a seeded
    sample of Tiny-ImageNet's pool split (sorted by class, so its first images would be five
    classes only)."""
    from specialize.models.zoo import input_transform
    from streams.datasets import load_dataset

    split = "pool" if dataset == "tiny_imagenet" else "test"
    data = load_dataset(dataset, split=split, root=root)
    count = min(count, len(data.labels))
    if dataset == "tiny_imagenet":
        order = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(seed))
        data = data.subset(order[:count])
    transform = input_transform(model, data)
    return transform(data.images[:count]), data.labels[:count]


# -- runners -------------------------------------------------------------------------------

Runner = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def make_runners(gated: MultiExitNet, static: MultiExitNet, threshold: float,
                 measure: str) -> dict[str, Runner]:
    """Each runner maps a batch to (pred, accounted FLOPs or None, exit index or None)."""
    executor = DynamicExecutor(gated)
    static_executor = DynamicExecutor(static)

    def run_static(x: torch.Tensor):
        return static(x)[-1].argmax(dim=1), None, None

    def run_static_folded(x: torch.Tensor):
        result = static_executor.run(x, math.inf, measure)
        return result.pred, result.flops, result.exit_index

    def run_reference(x: torch.Tensor):
        result = reference_result(gated, x, threshold, measure)
        return result.pred, result.flops, result.exit_index

    def run_executor(x: torch.Tensor):
        result = executor.run(x, threshold, measure)
        return result.pred, result.flops, result.exit_index, result.flops_executed

    return {"static": run_static, "static-folded": run_static_folded,
            "reference": run_reference, "executor": run_executor}


def time_runners(runners: dict[str, Runner], inputs: torch.Tensor, batch_size: int,
                 repeats: int, progress: bool, label: str) -> tuple[dict, dict]:
    """Median wall time of one pass of each runner, interleaved; outputs of the first pass."""
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list] = {}
    for name in names:  # warm-up
        for batch in batches[: max(1, 20 // batch_size)]:
            runners[name](batch)
    bar = tqdm(total=repeats * len(names) * len(batches), desc=label, disable=not progress,
               file=sys.stderr, leave=False)
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            collected = []
            start = time.perf_counter()
            for batch in batches:
                collected.append(runners[name](batch))
            times[name].append(time.perf_counter() - start)
            bar.update(len(batches))
            outputs.setdefault(name, collected)
    bar.close()
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def summarise(times: dict, outputs: dict, labels: torch.Tensor, static_flops: int,
              count: int) -> dict:
    """Per runner: ms/sample, mean FLOPs, accuracy; and the executor's ratios."""
    rows = {}
    for name, collected in outputs.items():
        pred = torch.cat([c[0] for c in collected])
        flops = (torch.full_like(pred, static_flops) if collected[0][1] is None
                 else torch.cat([c[1] for c in collected]))
        row = {"ms_per_sample": 1e3 * times[name] / count,
               "mflops": flops.double().mean().item() / 1e6,
               "accuracy": (pred == labels).double().mean().item()}
        if collected[0][2] is not None:
            exits = torch.cat([c[2] for c in collected])
            row["exit_histogram"] = torch.bincount(exits).tolist()
        if len(collected[0]) > 3:
            executed = torch.cat([c[3] for c in collected])
            row["mflops_executed"] = executed.double().mean().item() / 1e6
        rows[name] = row
    ex, static, folded = rows["executor"], rows["static"], rows["static-folded"]
    flops_ratio = static["mflops"] / ex["mflops"]
    speedup = static["ms_per_sample"] / ex["ms_per_sample"]
    speedup_folded = folded["ms_per_sample"] / ex["ms_per_sample"]
    ref_exits = torch.cat([c[2] for c in outputs["reference"]])
    ex_exits = torch.cat([c[2] for c in outputs["executor"]])
    return {
        "flops_ratio": flops_ratio,
        "speedup": speedup,
        "efficiency": speedup / flops_ratio,
        "speedup_vs_static_folded": speedup_folded,
        "efficiency_vs_static_folded": speedup_folded / flops_ratio,
        "executed_flops_ratio": static["mflops"] / ex["mflops_executed"],
        "accuracy": {name: row["accuracy"] for name, row in rows.items()},
        "exit_agreement_with_reference": (ref_exits == ex_exits).double().mean().item(),
        "samples": count,
        "runners": rows,
    }


def print_table(report: dict) -> None:
    print(f"model: {report['model']}\nstatic: {report['static']}")
    print(f"threshold {report['threshold']} ({report['measure']}), {report['threads']} "
          f"threads, median of {report['repeats']} interleaved repeats; FLOPs = 2 x MACs")
    header = (f"{'batch':>5}  {'runner':<14}{'ms/sample':>10}{'MFLOPs':>9}{'executed':>9}"
              f"{'accuracy':>9}{'speedup':>8}  exits")
    for key in ("batch1", "batch64"):
        if key not in report:
            continue
        section = report[key]
        print("\n" + header)
        static_ms = section["runners"]["static"]["ms_per_sample"]
        for name, row in section["runners"].items():
            executed = row.get("mflops_executed", row["mflops"])
            print(f"{section['batch_size']:>5}  {name:<14}{row['ms_per_sample']:>10.3f}"
                  f"{row['mflops']:>9.2f}{executed:>9.2f}{row['accuracy']:>9.4f}"
                  f"{static_ms / row['ms_per_sample']:>8.2f}  "
                  f"{row.get('exit_histogram', '')}")
        print(f"  executor: flops_ratio {section['flops_ratio']:.2f}  speedup "
              f"{section['speedup']:.2f}  efficiency {section['efficiency']:.2f}  "
              f"(vs static-folded: speedup {section['speedup_vs_static_folded']:.2f}, "
              f"efficiency {section['efficiency_vs_static_folded']:.2f})  exit agreement "
              f"with reference {section['exit_agreement_with_reference']:.4f}")


def warn_if_busy(threads: int) -> None:
    """Say so when other processes compete for the cores (timings then mean little)."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > 0.5 and threads > 1 and load + threads > cores + 0.5:
        print(f"warning: load average {load:.1f} on {cores} cores; with {threads} threads, "
              "OpenMP threads wait for descheduled peers and batch-1 timings can be 10-100x "
              "slower and erratic (try --threads 1)", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warn_if_busy(args.threads)
    gated, static, source, static_source = load_models(args)
    inputs, labels = load_inputs(gated, max(args.samples_batch1, args.samples_batched),
                                 args.data_root, args.dataset, args.seed)
    if args.channels_last:
        gated = gated.to(memory_format=torch.channels_last)
        static = static.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    runners = make_runners(gated, static, args.threshold, args.measure)
    report = {"model": source, "static": static_source, "threshold": args.threshold,
              "measure": args.measure, "threads": args.threads, "repeats": args.repeats,
              "gate_mode": gated.gate_mode, "channels_last": args.channels_last}
    static_flops = static.exit_info[-1]["flops"]
    settings = (("batch1", 1, args.samples_batch1), ("batch64", args.batch_size,
                                                     args.samples_batched))
    with torch.inference_mode():
        for key, batch_size, count in settings:
            count = min(count, len(inputs))
            times, outputs = time_runners(runners, inputs[:count], batch_size, args.repeats,
                                          not args.no_progress, f"batch {batch_size}")
            report[key] = summarise(times, outputs, labels[:count], static_flops, count)
            report[key]["batch_size"] = batch_size
            report[key]["threshold"] = args.threshold
    if args.save:
        Path(args.save).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
