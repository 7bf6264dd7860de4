"""Head weights as data: snapshots, loading, the flat tensor list and the precomputed prefix.

Shared by the trainer (which restores its heads), the updater (which serves, publishes and
rolls back) and ``benchmarks/head_ceiling.py`` (which splits the heads where the updater does).
"""

from __future__ import annotations

from torch import Tensor, nn

# Parameter-free, deterministic layers that may be applied once at observe time.
_PRECOMPUTABLE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d,
                  nn.Flatten, nn.Identity)

HeadsState = list[dict[str, Tensor]]  # one state dict per head


def snapshot_heads(heads: nn.ModuleList) -> HeadsState:
    """A detached copy of every head's state dict."""
    return [{k: v.detach().clone() for k, v in head.state_dict().items()} for head in heads]


def load_heads(heads: nn.ModuleList, state: HeadsState) -> None:
    """Load one state dict into each head (as many states as heads)."""
    for head, head_state in zip(heads, state, strict=True):
        head.load_state_dict(head_state)


def head_tensors(heads: nn.ModuleList) -> list[Tensor]:
    """The live tensors (parameters and buffers) of every head, in state-dict order."""
    return [t for head in heads for t in head.state_dict(keep_vars=True).values()]


def precomputed_prefix(head: nn.Module) -> int:
    """How many leading layers of ``head`` are parameter-free and may run at observe time."""
    if not isinstance(head, nn.Sequential):
        return 0
    count = 0
    for layer in head:
        if not isinstance(layer, _PRECOMPUTABLE) or any(True for _ in layer.parameters()):
            break
        count += 1
    return count if count < len(head) else 0
