import math

import pytest
import torch

from backbones.exit_rule import (
    CONFIDENCE_MEASURES,
    accepts,
    confidence,
    normalize_thresholds,
    select_exits,
)


def test_measures_are_listed():
    assert CONFIDENCE_MEASURES == ("max_softmax", "margin", "neg_entropy")


def test_confidence_values_by_hand():
    # Row 0: uniform over 2 classes. Row 1: probabilities (0.6, 0.2, 0.2) padded by a
    # masked class (-inf logit) that must not produce NaN.
    logits = torch.tensor(
        [[0.0, 0.0, -math.inf, -math.inf], [math.log(3.0), 0.0, 0.0, -math.inf]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(confidence(logits), torch.tensor([0.5, 0.6], dtype=torch.float64))
    torch.testing.assert_close(
        confidence(logits, "margin"), torch.tensor([0.0, 0.4], dtype=torch.float64)
    )
    expected = [-math.log(2.0), 0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2)]
    torch.testing.assert_close(
        confidence(logits, "neg_entropy"), torch.tensor(expected, dtype=torch.float64)
    )


def test_confidence_ranges_and_dtypes():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 5
    for measure in CONFIDENCE_MEASURES:
        values = confidence(logits, measure)
        assert values.shape == (64,) and values.dtype == torch.float32
    assert (confidence(logits, "neg_entropy") <= 0).all()
    assert (confidence(logits, "neg_entropy") >= -math.log(10) - 1e-6).all()
    assert ((confidence(logits, "margin") >= 0) & (confidence(logits, "margin") <= 1)).all()
    assert confidence(logits.half()).dtype == torch.float32
    torch.testing.assert_close(
        confidence(torch.zeros(2, 5), "neg_entropy"), -torch.full((2,), math.log(5))
    )
    assert confidence(torch.zeros(3, 1), "margin").tolist() == [1.0, 1.0, 1.0]


def test_confidence_errors():
    with pytest.raises(ValueError, match="max_softmax, margin, neg_entropy"):
        confidence(torch.zeros(2, 3), "entropy")
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        confidence(torch.zeros(3))


def test_accepts_is_inclusive():
    values = torch.tensor([0.4, 0.5, 0.6])
    assert accepts(values, 0.5).tolist() == [False, True, True]
    assert accepts(values, torch.tensor([0.5, 0.5, 0.7])).tolist() == [False, True, False]


def test_select_exits_ties_last_exit_and_nan():
    confidences = torch.tensor(
        [
            [0.5, 0.9, 0.1],  # tie at exit 0 accepts
            [0.4, 0.7, 0.0],  # tie at exit 1
            [0.1, 0.2, 0.0],  # nothing clears: last exit, whatever its threshold
            [math.nan, 0.8, 0.3],  # NaN never clears
        ]
    )
    thresholds = torch.tensor([0.5, 0.7, math.inf], dtype=torch.float64)
    exits = select_exits(confidences, thresholds)
    assert exits.dtype == torch.int64
    assert exits.tolist() == [0, 1, 2, 1]
    assert select_exits(confidences, [math.inf, math.inf, 0.0]).tolist() == [2, 2, 2, 2]


def test_select_exits_matches_reference_loop():
    gen = torch.Generator().manual_seed(1)
    confidences = torch.randint(0, 5, (300, 4), generator=gen).float() / 4
    thresholds = torch.tensor([0.75, 0.5, 1.0, 0.25])
    expected = []
    for row in confidences.tolist():
        expected.append(next((k for k in range(3) if row[k] >= thresholds[k]), 3))
    assert select_exits(confidences, thresholds).tolist() == expected


def test_select_exits_errors():
    with pytest.raises(ValueError, match="normalize_thresholds"):
        select_exits(torch.zeros(5, 3), [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        select_exits(torch.zeros(5), [0.5])


def test_normalize_thresholds():
    assert normalize_thresholds(0.8, 3).tolist() == [0.8, 0.8, -math.inf]
    assert normalize_thresholds([0.7, 0.9], 3).tolist() == [0.7, 0.9, -math.inf]
    assert normalize_thresholds((0.7, 0.9, 0.3), 3).tolist() == [0.7, 0.9, -math.inf]
    assert normalize_thresholds(torch.tensor([0.5, math.inf]), 3).tolist()[:2] == [0.5, math.inf]
    assert normalize_thresholds(0.8, 1).tolist() == [-math.inf]
    assert normalize_thresholds([], 1).tolist() == [-math.inf]
    assert normalize_thresholds(0.8, 2).dtype == torch.float64


@pytest.mark.parametrize(
    ("thresholds", "num_exits", "match"),
    [
        ([0.5], 3, "2 \\(one per early exit\\) or 3"),
        ([0.5, 0.5, 0.5, 0.5], 3, "got shape"),
        ([[0.5, 0.5]], 3, "got shape"),
        ([0.5, math.nan], 3, "NaN"),
        (0.5, 0, "at least 1"),
    ],
)
def test_normalize_thresholds_errors(thresholds, num_exits, match):
    with pytest.raises(ValueError, match=match):
        normalize_thresholds(thresholds, num_exits)
