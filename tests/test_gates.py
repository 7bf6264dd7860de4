import pytest
import torch

from backbones.gates import BlockGate, ReLU1, leaky_relu1, relu1


def test_relu1_values_and_gradient():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.7], requires_grad=True)
    y = relu1(x)
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.3, 1.0, 1.0])
    y.sum().backward()
    assert x.grad[[0, 1, 5]].tolist() == [0.0, 0.0, 0.0]
    assert x.grad[3] == 1.0


def test_leaky_relu1_values_and_gradient():
    x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    y = leaky_relu1(x, 0.1)
    assert y.tolist() == pytest.approx([-0.2, 0.5, 1.2])
    y.sum().backward()
    assert x.grad.tolist() == pytest.approx([0.1, 1.0, 0.1])


def test_leaky_relu1_is_continuous_at_the_kinks():
    eps = 1e-6
    for point in (0.0, 1.0):
        left = leaky_relu1(torch.tensor(point - eps), 0.2)
        right = leaky_relu1(torch.tensor(point + eps), 0.2)
        assert abs(float(left - right)) < 1e-5


def test_relu1_module_is_leaky_only_in_training():
    act = ReLU1(0.1, straight_through=False)
    x = torch.tensor([-1.0, 2.0])
    assert act.train()(x).tolist() == pytest.approx([-0.1, 1.1])
    assert act.eval()(x).tolist() == pytest.approx([0.0, 1.0])


def test_straight_through_relu1_has_hard_values_and_leaky_gradients():
    act = ReLU1(0.1).train()
    x = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    y = act(x)
    assert y.tolist() == pytest.approx([0.0, 0.5, 1.0])
    y.sum().backward()
    assert x.grad.tolist() == pytest.approx([0.1, 1.0, 0.1])


def test_relu1_rejects_negative_slope():
    with pytest.raises(ValueError, match="negative_slope"):
        ReLU1(-0.1)


def test_block_gate_shares_one_pool_and_shapes():
    gate = BlockGate(8, 5).eval()
    with torch.no_grad():
        decision = gate(torch.randn(3, 8, 4, 4))
    assert decision.block_salience.shape == (3,)
    assert decision.channel_salience.shape == (3, 5)
    assert float(decision.channel_salience.min()) >= 0
    assert float(decision.channel_salience.max()) <= 1
