"""Shared fixtures: tiny models and deterministic seeds."""

from __future__ import annotations

import pytest
import torch

from backbones import create_backbone

TINY_INPUT = (1, 16, 16)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _pass_cache(tmp_path_factory):
    """Validation passes that tests make are cached in a temporary folder, not the user's."""
    import specialize.run.budget as budget_run

    folder = tmp_path_factory.mktemp("cache")
    original = budget_run.cache_dir
    budget_run.cache_dir = lambda: folder
    yield folder
    budget_run.cache_dir = original


def tiny_model(name: str = "tiny_resnet", **kwargs: object):
    """A small multi-exit model on 16x16 inputs, in eval mode."""
    kwargs.setdefault("input_size", TINY_INPUT)
    kwargs.setdefault("in_chans", kwargs["input_size"][0])
    kwargs.setdefault("num_classes", 10)
    return create_backbone(name, **kwargs).eval()


def randomize_gates(model: torch.nn.Module, seed: int = 0, closed_fraction: float = 0.3) -> None:
    """Give every gate random weights so that some blocks and channels are exactly zero."""
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if name.endswith(".gate"):
            fc = module.fc
            with torch.no_grad():
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) * 0.5)
                bias = torch.rand(fc.bias.shape, generator=generator) * 1.5 - 1.5 * closed_fraction
                fc.bias.copy_(bias)


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: thread-pool wake-ups cost more than tiny tensors save on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    """A tiny multi-exit model; tests deep-copy it before changing it."""
    torch.manual_seed(0)
    return tiny_model("tiny_resnet")


@pytest.fixture(scope="module")
def shapes(base):
    """Shapes of the features each exit head of ``base`` reads."""
    with torch.no_grad():
        return [f.shape[1:] for f in base.forward_exits(torch.zeros(1, *TINY_INPUT)).features]
