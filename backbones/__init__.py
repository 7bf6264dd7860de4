"""Multi-exit networks with LC-Net gating (networks only: no streams, no policies)."""

from backbones import resnets as _resnets  # noqa: F401  (registers the entry points)
from backbones.contract import ExitOutputs, MultiExitModel, check_multi_exit_model
from backbones.gates import GateDecision, ReLU1, leaky_relu1, relu1
from backbones.multi_exit import MultiExitNet
from backbones.registry import create_backbone, list_backbones, register_backbone

__all__ = [
    "ExitOutputs",
    "GateDecision",
    "MultiExitModel",
    "MultiExitNet",
    "ReLU1",
    "check_multi_exit_model",
    "create_backbone",
    "leaky_relu1",
    "list_backbones",
    "register_backbone",
    "relu1",
]
