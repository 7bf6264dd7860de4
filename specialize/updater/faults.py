"""A fault to inject on purpose: early heads that answer a wrong class confidently.

``updater.inject_bad_head_at=N`` replaces the served early heads with :func:`bad_heads` of
them after ``N`` observed samples, so a run can show that the health check (audits, then
rollback) catches a head gone wrong. A random head would not do: an anchored head serves a
mixture with its frozen original, and a random half of that mixture is rarely confident
enough to answer early. The bad head names, for each input, the class the head itself holds
most similar to the one it would have answered (the nearest other row of its last linear
layer), at ``scale`` times its logits: a confident, plausible, wrong answer, the kind of
confusion pseudo-labels can teach (a T-shirt called a shirt).

Example:
    >>> layer = torch.nn.Linear(2, 3)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]))
    >>> bad = bad_heads([layer.state_dict()], scale=10.0)[0]
    >>> nearest_other_rows(layer.weight).tolist()
    [1, 0, 1]
    >>> torch.equal(bad["weight"], 10.0 * layer.weight[[1, 0, 1]])
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from specialize.updater.heads import HeadsState

__all__ = ["BAD_HEAD_SCALE", "bad_heads", "nearest_other_rows"]

BAD_HEAD_SCALE = 10.0  # logit scale of an injected head: sure of its (wrong) answers


def nearest_other_rows(weight: Tensor) -> Tensor:
    """For each row of ``weight`` ``(C, D)``, the index of the most similar other row (cosine)."""
    unit = torch.nn.functional.normalize(weight.detach().double(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argmax(dim=1)


def _last_linear(state: dict[str, Tensor]) -> tuple[str, str | None]:
    """The keys of the last 2-D weight (the logits layer) of a head's state and its bias."""
    weights = [key for key, value in state.items()
               if key.endswith("weight") and value.dim() == 2]
    if not weights:
        raise ValueError("a head without a linear logits layer cannot be made a bad head")
    bias = weights[-1].removesuffix("weight") + "bias"
    return weights[-1], bias if bias in state else None


def bad_heads(heads: HeadsState, scale: float = BAD_HEAD_SCALE) -> HeadsState:
    """Copies of ``heads`` whose logit of class ``j`` is ``scale`` times that of its nearest class.

    Args:
        heads: One state dict per head (``snapshot_heads``); not modified.
        scale: Multiplies the logits, so the wrong answers are confident.

    Returns:
        The bad heads' states, loadable into the same heads.
    """
    bad = []
    for state in heads:
        state = {key: value.clone() for key, value in state.items()}
        weight_key, bias_key = _last_linear(state)
        rows = nearest_other_rows(state[weight_key])
        for key in (weight_key, bias_key):
            if key is not None:
                state[key] = scale * state[key][rows]
        bad.append(state)
    return bad
