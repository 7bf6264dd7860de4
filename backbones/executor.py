"""Inference executor that really skips what the LC-Net gates and the exits say to skip.

``MultiExitNet.forward_exits`` is the reference: it computes everything and multiplies by the
gate outputs (masks), so its cost is only *accounted*. :class:`DynamicExecutor` runs the same
network so that the skipped work is not executed:

* **Batch 1** (the on-device case): exits are evaluated in order and the run stops at the
  first confident exit. In every gated block the gate runs first; ``S_L = 0`` skips the
  residual branch; in the ``sequential`` configuration the first conv computes only the kept
  filters (weight rows sliced), in both configurations the next conv reads only the kept
  channels (weight columns sliced). In the ``parallel`` configuration the first conv computes
  all its filters, because it runs beside the gates (LC-Net section 3.3.2). The FLOPs that run
  are exactly the FLOPs ``backbones.cost`` accounts (``flops == flops_executed``), for models
  whose gated convs are not grouped.
* **Batched**: stage by stage; samples that exited are dropped from the batch (compaction),
  so deeper stages run on fewer samples. Inside a gated block only the rows with ``S_L > 0``
  run the branch; the convs are sliced to the *union* of the channels those rows keep and the
  rows are masked inside it. ``flops`` is what LC-Net accounts per sample, ``flops_executed``
  what actually ran for it (union slicing runs a few more FLOPs than accounted).

BatchNorm is folded into the conv weights once, when the executor is built. The exit heads are
not folded: they are read from ``model.heads`` at every run, so head updates published into
the model are used by the next run. Rebuild the executor if the backbone changes.

Grouped second convs (ResNeXt) cannot be sliced by input channel cheaply: their blocks fall
back to masked full convs; ``flops_executed`` reports it. Blocks with squeeze-excitation,
anti-aliasing, drop-block or drop-path layers, and non-ReLU activations, are not supported
(``NotImplementedError``).

FLOPs follow ``backbones.cost``: a multiply-add counts 2 (``FlopCounterMode`` convention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from backbones.blocks import is_gated
from backbones.cost import BlockCost, flops_per_sample, gated_block_flops
from backbones.exit_rule import accepts, confidence, normalize_thresholds, select_exits
from backbones.gates import GateDecision
from backbones.multi_exit import MultiExitNet

__all__ = ["DynamicExecutor", "ExecutorResult", "fold_conv_bn"]

Thresholds = float | Sequence[float] | Tensor


@dataclass
class ExecutorResult:
    """What :meth:`DynamicExecutor.run` returns for a batch of ``B`` samples.

    Attributes:
        pred: int64 ``(B,)``: argmax of the answering exit's logits.
        exit_index: int64 ``(B,)``: the exit that answered.
        confidence: ``(B,)``: that exit's confidence.
        flops: int64 ``(B,)``: FLOPs LC-Net accounts for the sample (``backbones.cost``).
        flops_executed: int64 ``(B,)``: conv/linear FLOPs that actually ran for the sample.
        logits: ``(B, num_classes)``: logits of the answering exit.
        features: Entry ``k`` is the tensor head ``k`` read, one row per sample that
            evaluated exit ``k`` (the stage output itself, not a copy).
        evaluated: Entry ``k`` is int64 ``(n_k,)``: the batch indices of the rows of
            ``features[k]``.
    """

    pred: Tensor
    exit_index: Tensor
    confidence: Tensor
    flops: Tensor
    flops_executed: Tensor
    logits: Tensor
    features: list[Tensor] = field(default_factory=list)
    evaluated: list[Tensor] = field(default_factory=list)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the preceding conv.

    Args:
        conv: The convolution.
        bn: The BatchNorm that follows it (its running statistics are used).

    Returns:
        ``(weight, bias)``, contiguous and detached, such that
        ``conv2d(x, weight, bias) == bn(conv(x))`` up to rounding.
    """
    if bn.running_var is None or bn.running_mean is None:
        raise NotImplementedError("BatchNorm without running statistics cannot be folded")
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return weight.detach().contiguous(), bias.detach().contiguous()


class _Conv:
    """A conv with BatchNorm folded in, and its weight sliced by output or input channel.

    A conv that is sliced by input channel (``slice_inputs=True``) also keeps its weight laid
    out ``(in, kh, kw, out)``: selecting input channels from that layout is a gather of
    contiguous rows, which feeds an im2col matrix product. That path serves one sample whose
    conv weight outweighs its activation (deep stages), where gathering and repacking a conv
    weight column-wise costs more than the conv itself.
    """

    __slots__ = ("weight", "bias", "stride", "padding", "dilation", "groups", "by_input")

    def __init__(self, conv: nn.Conv2d, bn: nn.Module | None, slice_inputs: bool = False) -> None:
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={conv.padding_mode!r} is not supported")
        if bn is None:
            self.weight = conv.weight.detach().contiguous()
            self.bias = None if conv.bias is None else conv.bias.detach().contiguous()
        elif isinstance(bn, nn.BatchNorm2d):
            self.weight, self.bias = fold_conv_bn(conv, bn)
        else:
            raise NotImplementedError(
                f"cannot fold {type(bn).__name__} into a conv; only BatchNorm2d is supported"
            )
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        gemm = slice_inputs and not isinstance(conv.padding, str)
        self.by_input = self.weight.permute(1, 2, 3, 0).contiguous() if gemm else None

    def __call__(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def output_sliced(self, x: Tensor, kept: Tensor) -> Tensor:
        """Only the filters ``kept`` (their weight rows; a contiguous gather)."""
        return F.conv2d(x, self.weight.index_select(0, kept), self.bias.index_select(0, kept),
                        self.stride, self.padding, self.dilation, self.groups)

    def input_sliced(self, h: Tensor, kept: Tensor) -> Tensor:
        """The conv reading only input channels ``kept``; ``h`` holds just those channels."""
        if self.by_input is None or h.shape[0] > 1:
            return self._columns_sliced(h, kept)
        out_channels = self.weight.shape[0]
        height = _conv_size(h.shape[2], self.weight.shape[2], self.stride[0], self.padding[0],
                            self.dilation[0])
        width = _conv_size(h.shape[3], self.weight.shape[3], self.stride[1], self.padding[1],
                           self.dilation[1])
        if out_channels < 2 * height * width:  # the activation dominates: a plain conv
            return self._columns_sliced(h, kept)
        columns = F.unfold(h, self.weight.shape[2:], self.dilation, self.padding, self.stride)
        weight = self.by_input.index_select(0, kept).view(-1, out_channels)
        out = torch.addmm(self.bias, columns[0].t(), weight)
        return out.t().view(1, out_channels, height, width)

    def _columns_sliced(self, h: Tensor, kept: Tensor) -> Tensor:
        return F.conv2d(h, self.weight.index_select(1, kept), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


def _select_channels(x: Tensor, kept: Tensor) -> Tensor:
    """``x[:, kept]`` in the memory format of ``x`` (advanced indexing drops channels_last)."""
    if x.is_contiguous():
        return x.index_select(1, kept)
    return x.permute(0, 2, 3, 1).index_select(3, kept).permute(0, 3, 1, 2)


def _conv_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _relu(x: Tensor) -> Tensor:
    return x.relu_()


def _compile_sequential(module: nn.Module | None, what: str) -> list[Callable[[Tensor], Tensor]]:
    """Turn a stem / shortcut (conv, BN, ReLU, pooling) into folded functional steps."""
    if module is None:
        return []
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    steps: list[Callable[[Tensor], Tensor]] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Conv2d):
            bn = layers[i + 1] if i + 1 < len(layers) else None
            folds = isinstance(bn, nn.BatchNorm2d)
            steps.append(_Conv(layer, bn if folds else None))
            i += 2 if folds else 1
            continue
        if isinstance(layer, nn.ReLU):
            steps.append(_relu)
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            steps.append(layer)
        elif not isinstance(layer, nn.Identity):
            raise NotImplementedError(
                f"DynamicExecutor: unsupported layer {type(layer).__name__} in the {what}; "
                "supported: Conv2d (+BatchNorm2d), ReLU, MaxPool2d, AvgPool2d, Identity"
            )
        i += 1
    return steps


def _run_steps(steps: list[Callable[[Tensor], Tensor]], x: Tensor) -> Tensor:
    for step in steps:
        x = step(x)
    return x


def _check_block(block: nn.Module) -> None:
    """Reject block features the executor does not implement, saying which."""
    name = type(block).__name__
    if getattr(block, "se", None) is not None:
        raise NotImplementedError(f"DynamicExecutor: {name} with attention (se) is not supported")
    for attr in ("aa", "drop_block"):
        layer = getattr(block, attr, None)
        if layer is not None and not isinstance(layer, nn.Identity):
            raise NotImplementedError(
                f"DynamicExecutor: {name}.{attr} = {type(layer).__name__} is not supported "
                "(only nn.Identity)"
            )
    drop_path = getattr(block, "drop_path", None)
    if drop_path is not None and not isinstance(drop_path, nn.Identity):
        raise NotImplementedError(f"DynamicExecutor: {name} with drop_path is not supported")
    for attr in ("act1", "act2", "act3"):
        act = getattr(block, attr, None)
        if act is not None and not isinstance(act, nn.ReLU):
            raise NotImplementedError(
                f"DynamicExecutor: {name}.{attr} = {type(act).__name__}; only ReLU is supported"
            )


class _PlainBlock:
    """An ungated timm BasicBlock / Bottleneck with BatchNorm folded."""

    def __init__(self, block: nn.Module, cost: BlockCost) -> None:
        _check_block(block)
        convs = [_Conv(block.conv1, block.bn1), _Conv(block.conv2, block.bn2)]
        if isinstance(block, Bottleneck):
            convs.append(_Conv(block.conv3, block.bn3))
        self.convs = convs
        self.shortcut = _compile_sequential(block.downsample, "downsample")
        self.flops = cost.open

    def forward(self, x: Tensor) -> Tensor:
        shortcut = _run_steps(self.shortcut, x)
        *inner, last = self.convs
        for conv in inner:
            x = conv(x).relu_()
        return last(x).add_(shortcut).relu_()

    def run_one(self, x: Tensor) -> tuple[Tensor, int, int]:
        return self.forward(x), self.flops, self.flops

    def run_batch(self, x: Tensor, gate_mode: str) -> tuple[Tensor, Tensor | int, Tensor | int]:
        return self.forward(x), self.flops, self.flops


class _GatedBlock:
    """A gated BasicBlock / Bottleneck, BatchNorm folded, ready for sliced execution.

    ``first`` is the conv whose output channels the C-Net gates, ``second`` the conv that reads
    them; a Bottleneck adds ``tail`` (ReLU, then its last 1x1 conv).
    """

    def __init__(self, block: nn.Module, cost: BlockCost, gate_mode: str) -> None:
        _check_block(block)
        if not isinstance(block, (BasicBlock, Bottleneck)):
            raise NotImplementedError(f"DynamicExecutor: unsupported block {type(block).__name__}")
        fc = block.gate.fc
        # Stored transposed for addmm; the pooled input is a sum, the 1/(H*W) goes in alpha.
        self.gate_weight_t = fc.weight.detach().t()
        self.gate_bias = fc.bias.detach().contiguous()
        self.first = _Conv(block.conv1, block.bn1)
        self.second = _Conv(block.conv2, block.bn2, slice_inputs=block.conv2.groups == 1)
        self.tail = _Conv(block.conv3, block.bn3) if isinstance(block, Bottleneck) else None
        self.shortcut = _compile_sequential(block.downsample, "downsample")
        self.mid = block.conv1.out_channels
        self.sequential = gate_mode == "sequential"
        self.sliceable = self.second.groups == 1
        self.cost = cost
        self.gate_mode = gate_mode
        self.flops_table = _flops_table(cost, gate_mode)
        executed = self.flops_table if self.sliceable else _masked_flops_table(cost, gate_mode)
        self.executed_table = executed

    def gate(self, x: Tensor) -> Tensor:
        """``(B, 1 + mid)``: column 0 is ``S_L``, the rest ``S_C`` (eval-mode ReLU-1)."""
        pooled = x.sum((2, 3))
        scores = torch.addmm(self.gate_bias, pooled, self.gate_weight_t,
                             alpha=1.0 / (x.shape[2] * x.shape[3]))
        return scores.clamp_(0.0, 1.0)

    # -- batch 1 ---------------------------------------------------------------------------

    def run_one(self, x: Tensor) -> tuple[Tensor, int, int]:
        """One sample: returns the output, accounted FLOPs and executed FLOPs."""
        scores = self.gate(x)
        values = scores.tolist()[0]  # the one host read of the decisions
        block_salience = values[0]
        shortcut = _run_steps(self.shortcut, x) if self.shortcut else x
        full = None if self.sequential else self.first(x).relu_()  # runs beside the gates
        if block_salience <= 0.0:
            return shortcut.relu(), self.flops_table[0][0], self.executed_table[0][0]
        channel_salience = scores[0, 1:]
        if 0.0 in values:  # some channel is off (S_L > 0 here): find which
            kept = channel_salience.nonzero().view(-1)
            count = kept.numel()
        else:
            kept, count = None, self.mid
        flops = self.flops_table[1][count]
        if not self.sliceable:
            y = self._masked_branch(x, full, channel_salience.view(1, -1, 1, 1))
            return torch.add(shortcut, y, alpha=block_salience).relu_(), flops, \
                self.executed_table[1][count]
        if count == 0:
            y = self._bias_only(shortcut.shape)
        elif count == self.mid:
            h = self.first(x).relu_() if full is None else full
            y = self.second(h.mul_(channel_salience.view(1, -1, 1, 1)))
        else:
            if full is None:
                h = self.first.output_sliced(x, kept).relu_()
            else:
                h = full.index_select(1, kept)
            h = h.mul_(channel_salience.index_select(0, kept).view(1, -1, 1, 1))
            y = self.second.input_sliced(h, kept)
        if self.tail is not None and count > 0:
            y = self.tail(y.relu_())
        return torch.add(shortcut, y, alpha=block_salience).relu_(), flops, flops

    def _bias_only(self, shape: torch.Size) -> Tensor:
        """Branch output when no channel is kept: the second conv sees zeros (bias only)."""
        y = self.second.bias.view(1, -1, 1, 1).expand(shape[0], -1, *shape[2:])
        return y.clone() if self.tail is None else self.tail(y.relu())

    def _masked_branch(self, x: Tensor, full: Tensor | None, channel_scale: Tensor) -> Tensor:
        """Masked full convs (grouped second conv): every channel computed, zeros masked."""
        h = self.first(x).relu_() if full is None else full
        y = self.second(h.mul_(channel_scale))
        return y if self.tail is None else self.tail(y.relu_())

    # -- batched ---------------------------------------------------------------------------

    def run_batch(self, x: Tensor, gate_mode: str) -> tuple[Tensor, Tensor, Tensor]:
        """A batch: returns the output, accounted and executed FLOPs per row."""
        scores = self.gate(x)
        decision = GateDecision(scores[:, 0], scores[:, 1:])
        flops = gated_block_flops(self.cost, decision, gate_mode)
        # The input may be a stage output that a head read: only a fresh shortcut is reused.
        fresh = bool(self.shortcut)
        shortcut = _run_steps(self.shortcut, x) if fresh else x
        full = None if self.sequential else self.first(x).relu_()  # runs beside the gates
        rows = decision.block_salience.nonzero().view(-1)
        alive = rows.numel()
        if alive == 0:
            return (shortcut.relu_() if fresh else shortcut.relu()), flops, flops
        batch = x.shape[0]
        if alive < batch:  # advanced indexing keeps the memory format (index_select does not)
            x = x[rows]
            full = None if full is None else full[rows]
            decision = GateDecision(decision.block_salience[rows], decision.channel_salience[rows])
        y, computed = self._branch_batch(x, full, decision.channel_salience, shortcut.shape)
        block_salience = decision.block_salience
        if not bool((block_salience == 1.0).all()):  # ReLU-1 often saturates: skip a pass
            y = y.mul_(block_salience.view(-1, 1, 1, 1))
        if alive == batch:  # in place: out-of-place ops on large activations cost page faults
            out = y.add_(shortcut)
        else:
            out = (shortcut if fresh else shortcut.clone()).index_add_(0, rows, y)
        computed = computed.to(scores.dtype).expand(batch, -1)
        executed = gated_block_flops(self.cost, GateDecision(scores[:, 0], computed), gate_mode)
        return out.relu_(), flops, executed

    def _branch_batch(self, x: Tensor, full: Tensor | None, channel_salience: Tensor,
                      out_shape: torch.Size) -> tuple[Tensor, Tensor]:
        """Residual branch of the alive rows, sliced to the union of their kept channels.

        Returns the branch output (not yet scaled by ``S_L``) and the bool mask of the
        channels that were computed.
        """
        if not self.sliceable:
            computed = torch.ones(self.mid, dtype=torch.bool, device=x.device)
            return self._masked_branch(x, full, channel_salience[:, :, None, None]), computed
        computed = channel_salience.amax(dim=0) > 0
        kept = computed.nonzero().view(-1)
        count = kept.numel()
        if count == 0:
            return self._bias_only((x.shape[0], -1, *out_shape[2:])), computed
        if count == self.mid:
            h = self.first(x).relu_() if full is None else full
            y = self.second(h.mul_(channel_salience[:, :, None, None]))
        else:
            if full is None:
                h = self.first.output_sliced(x, kept).relu_()
            else:
                h = _select_channels(full, kept)
            y = self.second.input_sliced(h.mul_(channel_salience[:, kept, None, None]), kept)
        return (y if self.tail is None else self.tail(y.relu_())), computed


def _flops_table(cost: BlockCost, gate_mode: str) -> list[list[int]]:
    """``table[alive][kept]``: one sample's accounted FLOPs, straight from the cost model.

    Built once with ``backbones.cost.gated_block_flops`` over every (``S_L > 0``, number of
    kept channels) pair, so batch-1 execution looks its FLOPs up instead of recomputing them.
    """
    mid = cost.mid_chs
    kept = torch.arange(mid + 1)
    channel = (torch.arange(mid)[None, :] < kept[:, None]).float()
    rows = []
    for alive in (0.0, 1.0):
        decision = GateDecision(torch.full((mid + 1,), alive), channel)
        rows.append(gated_block_flops(cost, decision, gate_mode).tolist())
    return rows


def _masked_flops_table(cost: BlockCost, gate_mode: str) -> list[list[int]]:
    """Executed FLOPs of a masked (unsliced) block: every channel of a live branch runs."""
    table = _flops_table(cost, gate_mode)
    return [[row[0 if alive == 0 else cost.mid_chs]] * (cost.mid_chs + 1)
            for alive, row in enumerate(table)]


class _Head:
    """Exit head ``k``, read from ``model.heads`` at every call (heads may be updated)."""

    __slots__ = ("heads", "index", "module", "linear")

    def __init__(self, heads: nn.ModuleList, index: int) -> None:
        self.heads, self.index = heads, index
        self.module = heads[index]
        self.linear = _pool_fc_linear(self.module)

    def __call__(self, x: Tensor) -> Tensor:
        module = self.heads[self.index]
        if module is self.module and self.linear is not None:
            linear = self.linear
            return torch.addmm(linear.bias, x.sum((2, 3)), linear.weight.t(),
                               alpha=1.0 / (x.shape[2] * x.shape[3]))
        return module(x)


def _pool_fc_linear(head: nn.Module) -> nn.Linear | None:
    """The Linear of a ``pool_fc`` head (global average pool, flatten, linear), else None."""
    if not isinstance(head, nn.Sequential) or len(head) != 3:
        return None
    pool, flatten, linear = head
    if (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))
            and isinstance(flatten, nn.Flatten) and isinstance(linear, nn.Linear)
            and linear.bias is not None):
        return linear
    return None


class DynamicExecutor:
    """Run a ``MultiExitNet`` skipping what its gates and exits say to skip.

    Args:
        model: The network, in eval mode. Its stem and blocks are folded (BatchNorm into the
            convs) once, here; its heads are read live at every run.
        channels_last: Run batches in channels_last memory format from the stem output on
            (oneDNN's convs are several times faster in it on CPU for narrow layers); batch 1
            always runs contiguous (its convs are faster so).

    Example:
        >>> executor = DynamicExecutor(model.eval())
        >>> result = executor.run(x, thresholds=0.9)
        >>> result.pred, result.exit_index, result.flops
    """

    def __init__(self, model: MultiExitNet, *, channels_last: bool = True) -> None:
        if model.training:
            raise ValueError("DynamicExecutor needs the model in eval mode; call model.eval()")
        self.model = model
        self.channels_last = channels_last
        self.num_exits = model.num_exits
        self.gate_mode = model.gate_mode
        profile = model.cost_profile
        with torch.no_grad():
            self.stem = _compile_sequential(model.stem, "stem")
            blocks = [
                [self._plan(block, cost) for block, cost in zip(stage, costs)]
                for stage, costs in zip(model.stages, profile.blocks)
            ]
        self.stem_flops = profile.stem
        self.heads = [_Head(model.heads, k) for k in range(self.num_exits)]
        self.schedule = [
            (blocks[s], [k for k, stage in enumerate(model.exit_stages) if stage == s])
            for s in range(model.exit_stages[-1] + 1)
        ]
        self._thresholds: dict[object, tuple[Tensor, list[Tensor]]] = {}

    @property
    def head_flops(self) -> tuple[int, ...]:
        """Cost of each exit head, read live (anchoring heads re-measures the profile)."""
        return self.model.cost_profile.heads

    def _plan(self, block: nn.Module, cost: BlockCost) -> _GatedBlock | _PlainBlock:
        if is_gated(block):
            return _GatedBlock(block, cost, self.gate_mode)
        if isinstance(block, (BasicBlock, Bottleneck)):
            return _PlainBlock(block, cost)
        raise NotImplementedError(
            f"DynamicExecutor supports timm BasicBlock / Bottleneck (gated or not), "
            f"got {type(block).__name__}"
        )

    @property
    def gated_blocks(self) -> list[_GatedBlock]:
        """The gated block plans, in execution order (their folded weights live here)."""
        return [b for blocks, _ in self.schedule for b in blocks if isinstance(b, _GatedBlock)]

    def run(
        self, x: Tensor, thresholds: Thresholds, measure: str = "max_softmax", *,
        path: str = "auto",
    ) -> ExecutorResult:
        """Classify a batch, each sample stopping at its first confident exit.

        Args:
            x: Inputs ``(B, C, H, W)``.
            thresholds: Per-exit thresholds (see ``backbones.exit_rule.normalize_thresholds``:
                a number, or one value per early exit).
            measure: Confidence measure (``backbones.exit_rule.CONFIDENCE_MEASURES``).
            path: ``auto`` (sliced per-sample execution for ``B == 1``, batched otherwise),
                ``single`` (requires ``B == 1``) or ``batched``.

        Returns:
            Per-sample predictions, exits, confidences, FLOPs, logits and head inputs.
        """
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
        if path not in ("auto", "single", "batched"):
            raise ValueError(f"path must be 'auto', 'single' or 'batched', got {path!r}")
        if path == "single" and x.shape[0] != 1:
            raise ValueError(f"path='single' runs one sample, got a batch of {x.shape[0]}")
        per_exit = self._thresholds_for(thresholds)
        with torch.no_grad():
            if path == "single" or (path == "auto" and x.shape[0] == 1):
                return self._run_single(x, per_exit, measure)
            return self._run_batched(x, per_exit, measure)

    def _thresholds_for(self, thresholds: Thresholds) -> list[Tensor]:
        """One ``(1,)`` float64 threshold per exit (cached: batch-1 calls are hot)."""
        if isinstance(thresholds, (int, float)):
            key: object = float(thresholds)
        elif isinstance(thresholds, Tensor):
            key = tuple(thresholds.detach().flatten().tolist())
        else:
            key = tuple(float(t) for t in thresholds)
        cached = self._thresholds.get(key)
        if cached is None:
            values = normalize_thresholds(thresholds, self.num_exits)
            cached = (values, [values[k : k + 1] for k in range(self.num_exits)])
            if len(self._thresholds) > 64:
                self._thresholds.clear()
            self._thresholds[key] = cached
        return cached[1]

    # -- batch 1 ---------------------------------------------------------------------------

    def _run_single(self, x: Tensor, thresholds: list[Tensor], measure: str) -> ExecutorResult:
        flops = executed = self.stem_flops
        head_flops = self.head_flops
        x = _run_steps(self.stem, x)
        features = []
        last = self.num_exits - 1
        for blocks, exits in self.schedule:
            for block in blocks:
                x, block_flops, block_executed = block.run_one(x)
                flops += block_flops
                executed += block_executed
            for k in exits:
                logits = self.heads[k](x)
                flops += head_flops[k]
                executed += head_flops[k]
                features.append(x)
                conf = confidence(logits, measure)
                if k == last or accepts(conf, thresholds[k]).item():
                    index = torch.zeros(1, dtype=torch.long, device=x.device)
                    return ExecutorResult(
                        pred=logits.argmax(dim=1),
                        exit_index=torch.full((1,), k, dtype=torch.long, device=x.device),
                        confidence=conf,
                        flops=torch.full((1,), flops, dtype=torch.long, device=x.device),
                        flops_executed=torch.full((1,), executed, dtype=torch.long,
                                                  device=x.device),
                        logits=logits,
                        features=features,
                        evaluated=[index] * len(features),
                    )
        raise AssertionError("unreachable: the last exit always answers")

    # -- batched ---------------------------------------------------------------------------

    def _run_batched(self, x: Tensor, thresholds: list[Tensor], measure: str) -> ExecutorResult:
        batch, device = x.shape[0], x.device
        out = _BatchOutputs(batch, self.model.num_classes, device)
        rows = torch.arange(batch, device=device)
        flops = torch.full((batch,), self.stem_flops, dtype=torch.long, device=device)
        executed = flops.clone()
        head_flops = self.head_flops
        x = _run_steps(self.stem, x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last = self.num_exits - 1
        for blocks, exits in self.schedule:
            for block in blocks:
                x, block_flops, block_executed = block.run_batch(x, self.gate_mode)
                flops += block_flops
                executed += block_executed
            for k in exits:
                logits = self.heads[k](x)
                flops += head_flops[k]
                executed += head_flops[k]
                out.features.append(x)
                out.evaluated.append(rows)
                conf = confidence(logits, measure)
                if k == last:
                    out.store(rows, k, logits, conf, flops, executed)
                    return out.result()
                done = accepts(conf, thresholds[k])
                answered = done.nonzero().view(-1)
                if answered.numel() == 0:
                    continue
                if answered.numel() == rows.numel():
                    out.store(rows, k, logits, conf, flops, executed)
                    return out.result()
                out.store(rows, k, logits, conf, flops, executed, answered)
                stay = (~done).nonzero().view(-1)
                x, rows = x[stay], rows.index_select(0, stay)  # x[stay] keeps channels_last
                flops, executed = flops.index_select(0, stay), executed.index_select(0, stay)
        raise AssertionError("unreachable: the last exit always answers")


class _BatchOutputs:
    """Per-sample result tensors of a batched run, filled as samples exit."""

    def __init__(self, batch: int, num_classes: int, device: torch.device) -> None:
        long = {"dtype": torch.long, "device": device}
        self.pred = torch.empty(batch, **long)
        self.exit_index = torch.empty(batch, **long)
        self.flops = torch.empty(batch, **long)
        self.flops_executed = torch.empty(batch, **long)
        self.confidence: Tensor | None = None
        self.logits: Tensor | None = None
        self.features: list[Tensor] = []
        self.evaluated: list[Tensor] = []
        self.batch, self.num_classes = batch, num_classes

    def store(self, rows: Tensor, exit_index: int, logits: Tensor, conf: Tensor, flops: Tensor,
              executed: Tensor, answered: Tensor | None = None) -> None:
        """Record the samples ``rows[answered]`` (default: all ``rows``) as answered here."""
        if answered is not None:
            rows = rows.index_select(0, answered)
            logits, conf = logits.index_select(0, answered), conf.index_select(0, answered)
            flops, executed = flops.index_select(0, answered), executed.index_select(0, answered)
        if self.logits is None:
            self.logits = logits.new_empty(self.batch, logits.shape[1])
            self.confidence = conf.new_empty(self.batch)
        self.pred.index_copy_(0, rows, logits.argmax(dim=1))
        self.exit_index.index_fill_(0, rows, exit_index)
        self.flops.index_copy_(0, rows, flops)
        self.flops_executed.index_copy_(0, rows, executed)
        self.logits.index_copy_(0, rows, logits)
        self.confidence.index_copy_(0, rows, conf)

    def result(self) -> ExecutorResult:
        assert self.logits is not None and self.confidence is not None
        return ExecutorResult(
            pred=self.pred, exit_index=self.exit_index, confidence=self.confidence,
            flops=self.flops, flops_executed=self.flops_executed, logits=self.logits,
            features=self.features, evaluated=self.evaluated,
        )


def reference_result(
    model: MultiExitNet, x: Tensor, thresholds: Thresholds, measure: str = "max_softmax",
) -> ExecutorResult:
    """What the executor must reproduce, from the masked reference forward (all exits).

    Runs ``model.forward_exits(x)``, picks each sample's exit with
    ``backbones.exit_rule.select_exits`` and its FLOPs with ``backbones.cost.flops_per_sample``.
    ``flops_executed`` is the full path (the reference computes every exit).

    Args:
        model: The network, in eval mode.
        x: Inputs ``(B, C, H, W)``.
        thresholds: Per-exit thresholds (as for :meth:`DynamicExecutor.run`).
        measure: Confidence measure.

    Returns:
        The reference result; ``features[k]`` holds every sample (``evaluated[k]`` is all rows).
    """
    with torch.no_grad():
        out = model.forward_exits(x)
        confidences = torch.stack([confidence(logits, measure) for logits in out.logits], 1)
        exit_index = select_exits(confidences, normalize_thresholds(thresholds, len(out.logits)))
        stacked = torch.stack(out.logits, dim=1)
        logits = stacked[torch.arange(x.shape[0]), exit_index]
        flops = flops_per_sample(model, out.gates, exit_index)
    rows = torch.arange(x.shape[0], device=x.device)
    return ExecutorResult(
        pred=logits.argmax(dim=1),
        exit_index=exit_index,
        confidence=confidences.gather(1, exit_index.view(-1, 1)).squeeze(1),
        flops=flops,
        flops_executed=torch.full_like(flops, model.exit_info[-1]["flops"]),
        logits=logits,
        features=list(out.features),
        evaluated=[rows] * len(out.features),
    )
