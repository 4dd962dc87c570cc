# stat_tracking.py: DDPO's per-prompt reward normalisation, checked against hand computation, its JSON state and
# its input errors.
import json
import math

import numpy as np
import pytest

from stat_tracking import PerPromptStatTracker


def test_stat_tracker_against_hand_computation():
    eps = 1e-6
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    # call 1: every buffer shorter than min_count -> whole-batch mean 2, population std sqrt(2/3)
    adv = tracker.update(["a", "a", "b"], [1.0, 2.0, 3.0])
    s = math.sqrt(2 / 3) + eps
    np.testing.assert_allclose(adv, [-1 / s, 0.0, 1 / s], rtol=1e-12)
    # call 2: a -> [1,2,4] (mean 7/3), b -> [3,5,7] (mean 5); both reach min_count
    adv = tracker.update(["a", "b", "b"], [4.0, 5.0, 7.0])
    sa = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3) + eps
    sb = math.sqrt(8 / 3) + eps
    np.testing.assert_allclose(adv, [(4 - 7 / 3) / sa, 0.0, 2 / sb], rtol=1e-12)
    # call 3: a overflows to [2,4,6,8] (mean 5, std sqrt 5); new prompt c falls back to batch [6,8,0]
    adv = tracker.update(["a", "c", "a"], [6.0, 0.0, 8.0])
    sa = math.sqrt(5) + eps
    mc = 14 / 3
    sc = math.sqrt(((6 - mc) ** 2 + (8 - mc) ** 2 + (0 - mc) ** 2) / 3) + eps
    np.testing.assert_allclose(adv, [1 / sa, (0 - mc) / sc, 3 / sa], rtol=1e-12)
    assert list(tracker.buffers["a"]) == [2.0, 4.0, 6.0, 8.0]
    assert {k: len(v) for k, v in tracker.buffers.items()} == {"a": 4, "b": 3, "c": 1}


def test_stat_tracker_state_round_trip():
    calls = [(["x", "y", "x", "z"], [0.1, -0.3, 0.25, 0.7]),
             (["y", "y", "x", "z"], [0.2, 0.4, -0.1, 0.3]),
             (["x", "z", "y", "w"], [0.05, 0.9, -0.2, 0.0])]
    straight = PerPromptStatTracker(buffer_size=3, min_count=2)
    outs = [straight.update(p, v) for p, v in calls]
    first = PerPromptStatTracker(buffer_size=3, min_count=2)
    for p, v in calls[:2]:
        first.update(p, v)
    resumed = PerPromptStatTracker(buffer_size=3, min_count=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert np.array_equal(resumed.update(*calls[2]), outs[2])
    assert resumed.state_dict() == straight.state_dict()
    with pytest.raises(ValueError, match="same config"):
        PerPromptStatTracker(buffer_size=5, min_count=2).load_state_dict(first.state_dict())


def test_stat_tracker_rejects_bad_input():
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=2, min_count=3)
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    with pytest.raises(ValueError, match="finite"):
        tracker.update(["a", "b"], [1.0, float("nan")])
    with pytest.raises(ValueError, match="one value per prompt"):
        tracker.update(["a", "b"], [1.0])
    assert tracker.buffers == {}  # nothing was appended by the rejected calls
