"""Execution plans: each block and exit head of a ``MultiExitNet``, compiled once.

A block plan runs one block, BatchNorm folded: ``run_one(x)`` for one sample (sliced to the
channels its gates keep) and ``run_batch(x)`` for a batch (sliced to the union of the rows'
channels); both return the output, the FLOPs LC-Net accounts and the FLOPs that ran.
:class:`BlockPlan` is that interface: the runner walks any object that keeps it, so a stage of
another architecture (e.g. an ungated timm stage run whole) can be planned alongside.
"""

from __future__ import annotations

from typing import Protocol

import torch
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from backbones.blocks import is_gated
from backbones.contract import MultiExitModel
from backbones.cost import BlockCost, gated_block_flops
from backbones.executor.convs import (
    FoldedConv,
    Step,
    compile_sequential,
    run_steps,
    select_channels,
)
from backbones.gates import GateDecision
from backbones.timm_exits import IntermediateExitNet


class BlockPlan(Protocol):
    """A compiled block (or stage): what the runner calls, in execution order."""

    def run_one(self, x: Tensor) -> tuple[Tensor, int, int]:
        """One sample: the output, accounted FLOPs and executed FLOPs."""

    def run_batch(self, x: Tensor) -> tuple[Tensor, Tensor | int, Tensor | int]:
        """A batch: the output, accounted and executed FLOPs per row (or one number for all)."""


def plan_stages(model: MultiExitModel) -> tuple[list[Step], list[list[BlockPlan]]]:
    """Compile ``model``'s stem and the blocks of every stage.

    A ``MultiExitNet`` is compiled block by block, BatchNorm folded. A staged timm model
    (``IntermediateExitNet.staged``) runs each stage as it is (:class:`ModulePlan`).

    Returns:
        The stem's functional steps, and the block plans of each stage in order.

    Raises:
        NotImplementedError: A layer or block the executor does not implement, or a timm model
            that does not run stage by stage.
    """
    if isinstance(model, IntermediateExitNet):
        stages = [[ModulePlan(unit, cost) for unit, cost in zip(stage, costs)]
                  for stage, costs in zip(model.stages, model.cost_profile.blocks)]
        return [model.stem], stages
    stem = compile_sequential(model.stem, "stem")
    stages = [
        [plan_block(block, cost, model.gate_mode) for block, cost in zip(stage, costs)]
        for stage, costs in zip(model.stages, model.cost_profile.blocks)
    ]
    return stem, stages


def plan_block(block: nn.Module, cost: BlockCost, gate_mode: str) -> BlockPlan:
    """Compile a timm ``BasicBlock`` / ``Bottleneck``, gated or not, with its cost split.

    Raises:
        NotImplementedError: Another block type, or block features the executor lacks.
    """
    if is_gated(block):
        return GatedBlockPlan(block, cost, gate_mode)
    if isinstance(block, (BasicBlock, Bottleneck)):
        return PlainBlockPlan(block, cost)
    raise NotImplementedError(
        f"DynamicExecutor supports timm BasicBlock / Bottleneck (gated or not), "
        f"got {type(block).__name__}"
    )


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


class PlainBlockPlan:
    """An ungated timm BasicBlock / Bottleneck with BatchNorm folded."""

    def __init__(self, block: nn.Module, cost: BlockCost) -> None:
        _check_block(block)
        convs = [FoldedConv(block.conv1, block.bn1), FoldedConv(block.conv2, block.bn2)]
        if isinstance(block, Bottleneck):
            convs.append(FoldedConv(block.conv3, block.bn3))
        self.convs = convs
        self.shortcut = compile_sequential(block.downsample, "downsample")
        self.flops = cost.open

    def forward(self, x: Tensor) -> Tensor:
        """The block's output (residual branch plus shortcut, then ReLU)."""
        shortcut = run_steps(self.shortcut, x)
        *inner, last = self.convs
        for conv in inner:
            x = conv(x).relu_()
        return last(x).add_(shortcut).relu_()

    def run_one(self, x: Tensor) -> tuple[Tensor, int, int]:
        """One sample: the output and its (fixed) FLOPs, accounted and executed."""
        return self.forward(x), self.flops, self.flops

    def run_batch(self, x: Tensor) -> tuple[Tensor, int, int]:
        """A batch: the output and the (fixed) FLOPs of each row."""
        return self.forward(x), self.flops, self.flops


class ModulePlan:
    """An ungated module (a whole timm stage) run as it is; its FLOPs are fixed."""

    def __init__(self, module: nn.Module, cost: BlockCost) -> None:
        self.module = module
        self.flops = cost.open

    def run_one(self, x: Tensor) -> tuple[Tensor, int, int]:
        """One sample: the output and its FLOPs, accounted and executed."""
        return self.module(x), self.flops, self.flops

    def run_batch(self, x: Tensor) -> tuple[Tensor, int, int]:
        """A batch: the output and the FLOPs of each row."""
        return self.module(x), self.flops, self.flops


class GatedBlockPlan:
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
        self.first = FoldedConv(block.conv1, block.bn1)
        self.second = FoldedConv(block.conv2, block.bn2, slice_inputs=block.conv2.groups == 1)
        self.tail = FoldedConv(block.conv3, block.bn3) if isinstance(block, Bottleneck) else None
        self.shortcut = compile_sequential(block.downsample, "downsample")
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
        shortcut = run_steps(self.shortcut, x) if self.shortcut else x
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

    def run_batch(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A batch: returns the output, accounted and executed FLOPs per row."""
        scores = self.gate(x)
        decision = GateDecision(scores[:, 0], scores[:, 1:])
        flops = gated_block_flops(self.cost, decision, self.gate_mode)
        # The input may be a stage output that a head read: only a fresh shortcut is reused.
        fresh = bool(self.shortcut)
        shortcut = run_steps(self.shortcut, x) if fresh else x
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
        executed = gated_block_flops(self.cost, GateDecision(scores[:, 0], computed),
                                     self.gate_mode)
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
                h = select_channels(full, kept)
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


class HeadPlan:
    """Exit head ``k``, read from ``model.heads`` at every call (heads may be updated)."""

    __slots__ = ("heads", "index", "module", "linear")

    def __init__(self, heads: nn.ModuleList, index: int) -> None:
        self.heads, self.index = heads, index
        self.module = heads[index]
        self.linear = _pool_fc_linear(self.module)

    def __call__(self, x: Tensor) -> Tensor:
        """Logits of the head now in ``heads[index]`` (the fused pool + linear if unchanged)."""
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
