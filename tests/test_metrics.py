"""Metric maths against hand-computed values."""

import numpy as np

from cvtool.evaluate import label_index
from cvtool.metrics import confusion_matrix, per_class_report, rank_accuracy, true_class_rank


def test_confusion_and_report():
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    rep = per_class_report(cm, ["a", "b", "c"])
    assert rep["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert abs(rep["per_class"]["b"]["precision"] - 2 / 3) < 1e-12
    assert rep["per_class"]["c"]["f1"] == 0.0
    assert abs(rep["weighted_avg"]["recall"] - 3 / 5) < 1e-12


def test_rank():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    ranks = true_class_rank(probs, np.array([2, 0, 1]))
    assert ranks.tolist() == [1, 0, 2]
    assert rank_accuracy(ranks, 1) == 1 / 3 and rank_accuracy(ranks, 2) == 2 / 3


def test_label_index_gtsrb_names_and_ids():
    numeric_names = sorted(str(i) for i in range(12))  # "0", "1", "10", "11", "2", ...
    assert label_index("10", numeric_names) == numeric_names.index("10")
    assert label_index("2", numeric_names) == numeric_names.index("2")
    assert label_index("cat", ["cat", "dog"]) == 0
    assert label_index("1", ["cat", "dog"]) == 1
    assert label_index("5", ["cat", "dog"]) is None


def test_expected_calibration_error_over_15_equal_bins():
    from cvtool.metrics import calibration

    # bins are (b/15, (b+1)/15]: 0.88 and 0.9 share bin 13 (both right, mean confidence 0.89),
    # 0.95 is bin 14 (wrong), 0.6 is bin 8 (wrong: 0.6 * 15 = 9 is the top of bin 8), 0.0 is bin 0 (right)
    cal = calibration([0.88, 0.9, 0.95, 0.6, 0.0], [True, True, False, False, True])
    assert cal["bins"] == 15
    assert [i for i, n in enumerate(cal["bin_count"]) if n] == [0, 8, 13, 14]
    assert cal["bin_count"][13] == 2 and abs(cal["bin_confidence"][13] - 0.89) < 1e-12
    assert abs(cal["ece"] - (2 * 0.11 + 0.95 + 0.6 + 1.0) / 5) < 1e-12
    assert calibration([], [])["ece"] == 0.0
