"""Preparing a multi-exit model for head specialization, in tent's three plain functions.

:func:`configure_model` freezes everything but the early heads, :func:`collect_params` returns
what trains and :func:`check_model` asserts the preconditions with messages that say how to fix
them.
"""

from __future__ import annotations

from torch import nn

from backbones.contract import MultiExitModel
from specialize.updater.anchoring import AnchoredHead

__all__ = ["check_model", "collect_params", "configure_model", "trainable_part"]


def configure_model(model: MultiExitModel) -> MultiExitModel:
    """Prepare a multi-exit model for head specialization (in place).

    Puts the model in evaluation mode (the frozen backbone's BatchNorm statistics must not
    move during inference) and turns ``requires_grad`` off everywhere except in the heads of
    exits ``0..K-2``. The backbone, its gates and the final head stay frozen.

    Args:
        model: A ``MultiExitNet`` (anything with a ``heads`` ``nn.ModuleList``).

    Returns:
        The same model.
    """
    model.eval()
    model.requires_grad_(False)
    for head in model.heads[:-1]:
        trainable_part(head).requires_grad_(True)
    return model


def trainable_part(head: nn.Module) -> nn.Module:
    """The part of an exit head that specializes: an anchored head's ``spec``, else all."""
    return head.spec if isinstance(head, AnchoredHead) else head


def collect_params(model: MultiExitModel) -> tuple[list[nn.Parameter], list[str]]:
    """The parameters the updater trains: those of heads ``0..K-2`` that require grad.

    Args:
        model: A model prepared with :func:`configure_model`.

    Returns:
        ``(params, names)`` with names as in ``model.named_parameters()`` (``heads.0.2.weight``,
        ``heads.0.spec.2.weight`` when anchored).
    """
    params, names = [], []
    for index, head in enumerate(model.heads[:-1]):
        prefix = f"heads.{index}.spec." if isinstance(head, AnchoredHead) else f"heads.{index}."
        for name, param in trainable_part(head).named_parameters():
            if param.requires_grad:
                params.append(param)
                names.append(prefix + name)
    return params, names


def check_model(model: MultiExitModel) -> None:
    """Assert that ``model`` can be specialized safely; each message says how to fix it.

    Args:
        model: The model given to :class:`~specialize.updater.HeadUpdater`.

    Raises:
        AssertionError: The model has no early heads, is in training mode, or has trainable
            parameters outside the early heads (backbone, gates or final head).
    """
    heads = getattr(model, "heads", None)
    _require(isinstance(heads, nn.ModuleList),
             "the updater needs a multi-exit model with a `heads` nn.ModuleList; build one "
             "with backbones.create_backbone(...)")
    _require(len(heads) >= 2,
             f"the model has {len(heads)} exit; specialization needs at least 2 so that an "
             "early head can learn from a later exit (check exit_stages)")
    _require(not model.training,
             "the model is in training mode, so inference would update the frozen backbone's "
             "BatchNorm statistics; call model.eval() (configure_model(model) does)")
    early = {id(p) for head in heads[:-1] for p in trainable_part(head).parameters()}
    leaking = [name for name, p in model.named_parameters()
               if p.requires_grad and id(p) not in early]
    _require(not leaking,
             f"{len(leaking)} parameter(s) outside the early heads require grad (e.g. "
             f"{leaking[0] if leaking else ''}); the backbone, its gates and the final head "
             "must stay frozen: call specialize.updater.configure_model(model)")
    _require(bool(collect_params(model)[0]),
             "no parameter of the early heads requires grad, so there is nothing to "
             "specialize: call specialize.updater.configure_model(model)")


def _require(condition: bool, message: str) -> None:
    # An explicit raise rather than `assert`, so the checks survive `python -O`.
    if not condition:
        raise AssertionError(message)
