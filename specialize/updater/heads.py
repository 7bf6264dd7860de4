"""Head weights as data: snapshots, loading and the flat tensor list.

Shared by the trainer (which restores its heads) and the updater (which serves, publishes and
rolls back). Where a head may be split (its parameter-free prefix) is
``backbones.heads.precomputed_prefix``.
"""

from __future__ import annotations

from torch import Tensor, nn

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
