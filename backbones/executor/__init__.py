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

Modules: ``convs`` folds BatchNorm into conv weights and slices them; ``plans`` compiles each
block of the model (gated or plain) and each exit head into a plan with ``run_one`` (batch 1)
and ``run_batch``; ``runner`` holds :class:`DynamicExecutor`, which walks the plans stage by
stage and applies the exit rule, and :func:`reference_result`.
"""

from backbones.executor.convs import fold_conv_bn
from backbones.executor.runner import (
    AuditRecorder,
    AuditTrace,
    DynamicExecutor,
    ExecutorResult,
    reference_result,
)

__all__ = ["AuditRecorder", "AuditTrace", "DynamicExecutor", "ExecutorResult", "fold_conv_bn",
           "reference_result"]
