"""pruning.recovery: the share of renumbering's loss GAP gives back, on constructed runs whose answer is known."""

from __future__ import annotations

import pytest
from test_pruning_coverage import write_run

from pruning.recovery import gap_recovery, policy_difference


def hits(pattern, samples=400):
    return [{"index": i, "id": str(i), "iou": 1.0 if pattern(i) else 0.0, "error": None} for i in range(samples)]


def test_given_back_is_what_keep_recovers_of_what_reassign_lost(tmp_path):
    write_run(tmp_path / "rec" / "unpruned", {"method": "unpruned"}, hits(lambda i: i % 10 != 0))  # 0.9
    for budget, reassign, keep in (("0.5", lambda i: i % 10 == 1, lambda i: i % 10 not in (0, 9)),  # 0.1, 0.8
                                   ("0.9", lambda i: False, lambda i: i % 10 in (0, 1, 2))):  # 0, 0.3: 1 win
        for policy, pattern in (("reassign", reassign), ("keep", keep)):
            write_run(tmp_path / "rec" / "random" / budget / policy,
                      {"method": "random", "budget": budget, "positions": policy}, hits(pattern))
    table = gap_recovery(tmp_path, resamples=300).set_index("budget")
    half, most = table.loc["0.5"], table.loc["0.9"]
    assert (half.unpruned, half.reassign, half.keep) == pytest.approx((0.9, 0.1, 0.8))
    assert half.given_back == pytest.approx(0.7 / 0.8)
    assert half.given_back_low < half.given_back < half.given_back_high
    assert half.keep_wins == 0 and half.unpruned_wins == 40
    assert most.given_back == pytest.approx(0.3 / 0.9)
    assert most.keep_wins == 40 and most.unpruned_wins == 280  # samples 0 mod 10: keep hits, unpruned misses
    assert most.keep_minus_unpruned == pytest.approx(-0.6) and most.keep_minus_unpruned_high < 0


def test_a_directory_without_the_unpruned_run_is_named(tmp_path):
    with pytest.raises(ValueError, match="unpruned: missing"):
        gap_recovery(tmp_path)


def test_policy_difference_pairs_the_samples_of_two_policies(tmp_path):
    for budget, keep, compact in (("0.5", lambda i: i % 4 != 0, lambda i: i % 4 == 1),  # 0.75 against 0.25
                                  ("0.75", lambda i: i % 2 == 0, lambda i: i % 2 == 0)):  # the same samples
        for policy, pattern in (("keep", keep), ("compact", compact), ("reassign", lambda i: False)):
            write_run(tmp_path / "rec" / "random" / budget / policy,
                      {"method": "random", "budget": budget, "positions": policy}, hits(pattern))
    table = policy_difference(tmp_path, "keep", "compact", resamples=300).set_index("budget")
    assert (table.loc["0.5", "keep"], table.loc["0.5", "compact"]) == pytest.approx((0.75, 0.25))
    assert table.loc["0.5", "difference"] == pytest.approx(0.5)
    assert table.loc["0.5", "difference_low"] < 0.5 < table.loc["0.5", "difference_high"]
    # identical hits on identical samples: a paired difference of exactly zero in every resample
    assert table.loc["0.75", ["difference", "difference_low", "difference_high"]].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="under both 'keep' and 'permute'"):
        policy_difference(tmp_path, "keep", "permute")
