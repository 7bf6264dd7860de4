"""Anchored exit heads: a specialized head served as a mixture with its frozen original.

Specializing an early head on the stream's pseudo-labels makes it confident on the stream's
classes, also for inputs of other classes that look alike: the plain recipe answers those
early and wrongly. An anchored head answers with the mixture

    p(c | x) = (1 - w) * p_base(c | x) + w * p_spec(c | x)

of the frozen original head and the specialized one (``w`` is ``anchor_weight``). The mixture
is confident only where both heads agree: where the original head already leans the same way
the specialized head adds its confidence, elsewhere the original head's doubt keeps the
sample going deeper. It returns log-probabilities as logits, so ``softmax`` of its output is
the mixture exactly and every confidence measure sees the mixture.

While the specialized head equals the original (at the start and after a reset) the mixture
is the original head's distribution, so anchoring changes nothing until training moves it.
Serving an anchored head runs both heads (for the default pool + linear heads: a second
pooling and a second small linear layer). The model's cost profile is re-measured after
anchoring so the FLOPs reported include it (:func:`anchor_heads` does that).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones import MultiExitModel
from backbones.heads import split_head


class AnchoredHead(nn.Module):
    """Serves ``(1 - weight) * softmax(base(x)) + weight * softmax(spec(x))`` as log-probs.

    Args:
        spec: The head that is specialized (trained in place by the updater).
        base: A frozen copy of the original head.
        weight: Mixture weight of ``spec`` in ``(0, 1)`` (strategy ``plain`` is weight 1).
    """

    def __init__(self, spec: nn.Module, base: nn.Module, weight: float) -> None:
        super().__init__()
        if not 0.0 < weight < 1.0:
            raise ValueError(f"anchor weight must lie in (0, 1), got {weight}")
        self.spec = spec
        self.base = base
        self.weight = float(weight)
        self._log_weights = (math.log1p(-weight), math.log(weight))

    def forward(self, x: Tensor) -> Tensor:
        """Log of the mixture probabilities, ``(B, C)``."""
        log_spec = F.log_softmax(self.spec(x), dim=1)
        log_base = F.log_softmax(self.base(x), dim=1)
        return torch.logaddexp(log_base + self._log_weights[0], log_spec + self._log_weights[1])

    def extra_repr(self) -> str:
        """Shown by ``repr``: the mixture weight."""
        return f"weight={self.weight}"

    def split_prefix(self) -> tuple[nn.Module, nn.Module]:
        """``(prefix, mixture of the two bodies)`` when both heads share their prefix.

        Lets evaluation and training run the parameter-free pooling once for both heads
        (``backbones.heads.split_head``); ``(Identity, self)`` when the prefixes differ.
        """
        spec_prefix, spec_body = split_head(self.spec)
        base_prefix, base_body = split_head(self.base)
        if repr(spec_prefix) != repr(base_prefix):
            return nn.Identity(), self
        return spec_prefix, AnchoredHead(spec_body, base_body, self.weight)


def anchor_heads(model: MultiExitModel, weight: float) -> list[nn.Module]:
    """Anchor the early heads of ``model`` in place (the final head stays as it is).

    Each early head ``h`` becomes ``AnchoredHead(spec=h, base=frozen copy of h)``; the model's
    cost profile and ``exit_info`` are refreshed when it can (``refresh_cost_profile``).
    Anchoring an already anchored model only changes the weight.

    Args:
        model: A multi-exit model with ``heads`` (an ``nn.ModuleList``).
        weight: Mixture weight of the specialized heads.

    Returns:
        The specialized (trainable) heads, in exit order: the modules the updater trains.
    """
    specs = []
    for index, head in enumerate(list(model.heads)[:-1]):
        if isinstance(head, AnchoredHead):
            model.heads[index] = AnchoredHead(head.spec, head.base, weight)
        else:
            base = copy.deepcopy(head).requires_grad_(False)
            model.heads[index] = AnchoredHead(head, base, weight)
        specs.append(model.heads[index].spec)
    _refresh_cost(model)
    return specs


def unanchor_heads(model: MultiExitModel) -> None:
    """Serve the specialized heads alone again (drops the frozen originals)."""
    for index, head in enumerate(model.heads):
        if isinstance(head, AnchoredHead):
            model.heads[index] = head.spec
    _refresh_cost(model)


def heads_state(model: MultiExitModel) -> dict[str, Any]:
    """The served heads in a form a fresh model loads: ``model.heads`` keys, anchors apart.

    Returns:
        ``{"heads": state dict of the heads with each anchored head's specialized part in
        its place (keys as in an unanchored ``model.heads``), "anchor_weights": {exit index:
        weight} of the anchored heads}``. To serve it again: load ``heads`` into a fresh
        model's ``heads``, then ``anchor_heads`` with a frozen copy of the original heads
        (``HeadUpdater(model, UpdaterConfig(strategy="anchored"))`` before loading does it).
    """
    state: dict[str, Tensor] = {}
    weights: dict[int, float] = {}
    for index, head in enumerate(model.heads):
        if isinstance(head, AnchoredHead):
            weights[index] = head.weight
            head = head.spec
        for key, value in head.state_dict().items():
            state[f"{index}.{key}"] = value.detach().clone()
    return {"heads": state, "anchor_weights": weights}


def serve_heads_state(model: MultiExitModel, state: dict[str, Any]) -> None:
    """Serve what :func:`heads_state` saved: anchor as it says, then load the heads.

    ``model`` must serve its original heads (or be anchored on them already): each anchored
    head's frozen part is a copy of the head it wraps now.

    Args:
        model: The model whose heads to set.
        state: A :func:`heads_state` result.
    """
    weights = state["anchor_weights"]
    if weights:
        anchor_heads(model, next(iter(weights.values())))
    for index, head in enumerate(model.heads):
        target = head.spec if isinstance(head, AnchoredHead) else head
        prefix = f"{index}."
        target.load_state_dict({key[len(prefix):]: value for key, value in state["heads"].items()
                                if key.startswith(prefix)})


def is_anchored(model: MultiExitModel) -> bool:
    """Whether any head of ``model`` is an :class:`AnchoredHead`."""
    return any(isinstance(head, AnchoredHead) for head in model.heads)


def _refresh_cost(model: MultiExitModel) -> None:
    refresh = getattr(model, "refresh_cost_profile", None)
    if callable(refresh):
        refresh()
