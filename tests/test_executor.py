import pytest
import torch
from timm.models.resnet import Bottleneck
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from backbones.blocks import is_gated
from backbones.executor import DynamicExecutor, reference_result
from backbones.executor import convs as executor_module
from backbones.exit_rule import confidence
from backbones.resnets import timm_resnet
from tests.conftest import randomize_batchnorm, randomize_gates, tiny_model

NUM_SAMPLES = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def _gated_model(name: str, gate_mode: str, seed: int = 0) -> nn.Module:
    """A random gated model whose gates skip whole blocks and close every channel of some.

    Besides random gates, three blocks are forced: one skipped (``S_L = 0``), one alive with
    every channel closed, one alive with every channel open, for every input.
    """
    model = tiny_model(name, gate_mode=gate_mode)
    randomize_batchnorm(model, seed)
    randomize_gates(model, seed=seed, closed_fraction=0.4)
    gates = [block.gate.fc for stage in model.stages for block in stage if is_gated(block)]
    with torch.no_grad():
        for fc in gates:
            fc.weight.mul_(0.2)  # keep the input-dependent part small beside the forced biases
        gates[0].bias[0] = -5.0  # block skipped
        gates[1].bias[0], gates[1].bias[1:] = 5.0, -5.0  # alive, no channel kept
        gates[2].bias[0], gates[2].bias[1:] = 5.0, 5.0  # alive, every channel kept
    return model


def _thresholds(model: nn.Module, x: torch.Tensor, measure: str = "max_softmax") -> list[float]:
    """Per-exit thresholds that split the samples and sit far from every confidence.

    Exact ties between a confidence and its threshold could flip an exit on rounding
    differences (folded BatchNorm); the threshold is put in the widest gap near the median.
    """
    with torch.no_grad():
        logits = model(x)
    values = []
    for exit_logits in logits[:-1]:
        conf = confidence(exit_logits, measure).sort().values
        gaps = conf[1:] - conf[:-1]
        middle = slice(len(conf) // 4, 3 * len(conf) // 4)
        best = middle.start + int(gaps[middle].argmax())
        assert gaps[best] > 1e-5, "no clean threshold; change the seed"
        values.append(float(conf[best] + conf[best + 1]) / 2)
    return values


def _check_agrees(result, ref, atol: float = 1e-4) -> None:
    assert torch.equal(result.exit_index, ref.exit_index)
    assert torch.equal(result.pred, ref.pred)
    assert torch.equal(result.flops, ref.flops)
    assert result.flops.dtype == result.exit_index.dtype == result.pred.dtype == torch.int64
    torch.testing.assert_close(result.logits, ref.logits, atol=atol, rtol=0)
    torch.testing.assert_close(result.confidence, ref.confidence, atol=atol, rtol=0)


def _run(executor, x, thresholds, path):
    """Run a batch through the batched path, or sample by sample through the sliced one."""
    if path == "batched":
        return executor.run(x, thresholds)
    singles = [executor.run(x[i : i + 1], thresholds) for i in range(len(x))]
    fields = ("pred", "exit_index", "confidence", "flops", "flops_executed", "logits")
    merged = {f: torch.cat([getattr(r, f) for r in singles]) for f in fields}
    return type(singles[0])(**merged), singles


@pytest.mark.parametrize("path", ["single", "batched"])
@pytest.mark.parametrize("gate_mode", ["parallel", "sequential"])
@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_resnet_bottleneck"])
def test_executor_matches_reference(name, gate_mode, path):
    model = _gated_model(name, gate_mode)
    x = torch.randn(NUM_SAMPLES, *model.input_size)
    thresholds = _thresholds(model, x)
    ref = reference_result(model, x, thresholds)
    with torch.no_grad():
        gates = model.forward_exits(x).gates
    assert any((g.block_salience == 0).any() for g in gates), "no block is skipped"
    assert any(((g.channel_salience == 0).all(1) & (g.block_salience > 0)).any() for g in gates)
    assert len(set(ref.exit_index.tolist())) >= 3, "thresholds should spread the exits"

    executor = DynamicExecutor(model)
    out = _run(executor, x, thresholds, path)
    result = out[0] if path == "single" else out
    _check_agrees(result, ref)
    assert (result.flops_executed >= result.flops).all()
    if path == "single":
        assert torch.equal(result.flops_executed, result.flops)


@pytest.mark.parametrize("measure", ["margin", "neg_entropy"])
def test_other_confidence_measures_match_reference(measure):
    model = _gated_model("tiny_resnet", "sequential", seed=2)
    x = torch.randn(NUM_SAMPLES, *model.input_size)
    thresholds = _thresholds(model, x, measure)
    ref = reference_result(model, x, thresholds, measure)
    executor = DynamicExecutor(model)
    _check_agrees(executor.run(x, thresholds, measure), ref)
    for i in range(4):
        single = executor.run(x[i : i + 1], thresholds, measure)
        assert int(single.exit_index) == int(ref.exit_index[i])


@pytest.mark.parametrize("gate_mode", ["parallel", "sequential"])
def test_batched_memory_formats_agree(gate_mode):
    model = _gated_model("tiny_resnet_bottleneck", gate_mode, seed=5)
    x = torch.randn(NUM_SAMPLES, *model.input_size)
    thresholds = _thresholds(model, x)
    ref = reference_result(model, x, thresholds)
    for channels_last in (True, False):
        result = DynamicExecutor(model, channels_last=channels_last).run(x, thresholds)
        _check_agrees(result, ref)
        assert result.features[0].is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )


def test_batched_features_are_the_evaluated_rows_of_the_reference():
    model = _gated_model("tiny_resnet", "sequential", seed=1)
    x = torch.randn(NUM_SAMPLES, *model.input_size)
    thresholds = _thresholds(model, x)
    ref = reference_result(model, x, thresholds)
    result = DynamicExecutor(model).run(x, thresholds)
    assert len(result.features) == len(result.evaluated) == int(ref.exit_index.max()) + 1
    for k, (features, rows) in enumerate(zip(result.features, result.evaluated)):
        assert torch.equal(rows, (ref.exit_index >= k).nonzero().view(-1))
        torch.testing.assert_close(features, ref.features[k][rows], atol=1e-4, rtol=0)
    # Compaction: deeper exits see fewer rows.
    sizes = [len(rows) for rows in result.evaluated]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]


def test_single_sample_features_are_what_its_heads_read():
    model = _gated_model("tiny_resnet", "parallel")
    x = torch.randn(4, *model.input_size)
    thresholds = _thresholds(model, torch.randn(NUM_SAMPLES, *model.input_size))
    ref = reference_result(model, x, thresholds)
    executor = DynamicExecutor(model)
    for i in range(len(x)):
        result = executor.run(x[i : i + 1], thresholds)
        assert len(result.features) == int(result.exit_index) + 1
        for k, features in enumerate(result.features):
            assert result.evaluated[k].tolist() == [0]
            torch.testing.assert_close(features, ref.features[k][i : i + 1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("path", ["single", "batched"])
@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_resnet_bottleneck"])
def test_ungated_model_matches_reference(name, path):
    model = tiny_model(name, gating=False)
    randomize_batchnorm(model, 2)
    x = torch.randn(NUM_SAMPLES, *model.input_size)
    thresholds = _thresholds(model, x)
    ref = reference_result(model, x, thresholds)
    out = _run(DynamicExecutor(model), x, thresholds, path)
    result = out[0] if path == "single" else out
    _check_agrees(result, ref)
    assert torch.equal(result.flops_executed, result.flops)


@pytest.mark.parametrize("gate_mode", ["parallel", "sequential"])
@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_resnet_bottleneck"])
def test_single_sample_flops_equal_flop_counter(name, gate_mode):
    model = _gated_model(name, gate_mode, seed=3)
    x = torch.randn(8, *model.input_size)
    thresholds = _thresholds(model, torch.randn(NUM_SAMPLES, *model.input_size))
    executor = DynamicExecutor(model)
    counted, reported = [], []
    for i in range(len(x)):
        with FlopCounterMode(display=False) as counter:
            result = executor.run(x[i : i + 1], thresholds)
        counted.append(counter.get_total_flops())
        reported.append(int(result.flops))
    assert counted == reported
    assert len(set(reported)) > 1, "samples should differ in cost"


def test_batched_flops_counter_matches_executed_flops():
    model = _gated_model("tiny_resnet", "sequential", seed=4)
    x = torch.randn(NUM_SAMPLES, *model.input_size)
    thresholds = _thresholds(model, x)
    executor = DynamicExecutor(model)
    with FlopCounterMode(display=False) as counter:
        result = executor.run(x, thresholds)
    assert counter.get_total_flops() == int(result.flops_executed.sum())
    assert (result.flops_executed >= result.flops).all()
    assert (result.flops_executed <= model.exit_info[-1]["flops"]).all()


def test_batchnorm_is_folded_once_at_build_time(monkeypatch):
    model = _gated_model("tiny_resnet", "sequential")
    folds = []
    original = executor_module.fold_conv_bn
    monkeypatch.setattr(executor_module, "fold_conv_bn",
                        lambda *args: folds.append(1) or original(*args))
    executor = DynamicExecutor(model)
    built = len(folds)
    assert built > 0
    pointers = [(b.first.weight.data_ptr(), b.second.weight.data_ptr())
                for b in executor.gated_blocks]
    x = torch.randn(NUM_SAMPLES, *model.input_size)
    first = executor.run(x, 0.2)
    singles = [executor.run(x[i : i + 1], 0.2).logits for i in range(4)]
    second = executor.run(x, 0.2)
    again = [executor.run(x[i : i + 1], 0.2).logits for i in range(4)]
    assert len(folds) == built, "BatchNorm was folded again while running"
    assert pointers == [(b.first.weight.data_ptr(), b.second.weight.data_ptr())
                        for b in executor.gated_blocks]
    assert torch.equal(first.logits, second.logits) and torch.equal(first.flops, second.flops)
    assert all(torch.equal(a, b) for a, b in zip(singles, again))


def test_model_parameters_are_untouched_and_head_updates_are_seen():
    model = _gated_model("tiny_resnet", "parallel")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    executor = DynamicExecutor(model)
    x = torch.randn(NUM_SAMPLES, *model.input_size)
    executor.run(x, 0.5)
    executor.run(x[:1], 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        for head in model.heads[:-1]:
            head[-1].bias.add_(torch.randn(head[-1].bias.shape))
    thresholds = _thresholds(model, x)
    _check_agrees(executor.run(x, thresholds), reference_result(model, x, thresholds))
    model.heads[0] = nn.Sequential(nn.Flatten(1), nn.LazyLinear(10)).eval()
    with torch.no_grad():
        model.heads[0](x[:1].new_zeros(1, 16 * 16 * 16))
    thresholds = _thresholds(model, x)
    _check_agrees(executor.run(x, thresholds), reference_result(model, x, thresholds))


def test_grouped_conv_falls_back_to_masked_and_reports_executed_flops():
    model = timm_resnet(
        "tiny_resnext", Bottleneck, (1, 1, 1, 1),
        num_classes=10, in_chans=1, input_size=(1, 16, 16), small_input=True,
        cardinality=4, base_width=8, gate_mode="sequential",
    ).eval()
    randomize_batchnorm(model, 0)
    randomize_gates(model, seed=0, closed_fraction=0.4)
    x = torch.randn(8, *model.input_size)
    thresholds = _thresholds(model, x)
    ref = reference_result(model, x, thresholds)
    executor = DynamicExecutor(model)
    _check_agrees(executor.run(x, thresholds), ref)
    executed, accounted = 0, 0
    for i in range(len(x)):
        with FlopCounterMode(display=False) as counter:
            result = executor.run(x[i : i + 1], thresholds)
        assert counter.get_total_flops() == int(result.flops_executed)
        assert int(result.flops) == int(ref.flops[i])
        executed, accounted = executed + int(result.flops_executed), accounted + int(result.flops)
    assert executed > accounted


def test_unsupported_blocks_and_training_mode_are_rejected():
    model = tiny_model()
    model.stages[1][0].aa = nn.AvgPool2d(2)
    with pytest.raises(NotImplementedError, match="aa"):
        DynamicExecutor(model)
    with pytest.raises(ValueError, match="eval"):
        DynamicExecutor(tiny_model().train())
    executor = DynamicExecutor(tiny_model())
    with pytest.raises(ValueError, match="single"):
        executor.run(torch.randn(2, 1, 16, 16), 0.5, path="single")
