"""Curriculum and sampling-temperature controllers: the rules, and exact resume."""

import json

import pytest

from glm_jax.rl.curriculum import Curriculum, CurriculumState
from glm_jax.rl.temperature import PlateauTemperature, TemperatureState


def test_curriculum_advances_when_the_pass_rate_passes_the_threshold():
    cur = Curriculum(num_levels=3, threshold=0.75, window=2, min_attempts=16)
    s = cur.init()
    s = cur.update(s, passes=8, attempts=8)  # 100%, but only 8 attempts: too few to judge
    assert s.level == 0 and s.pass_rate == 1.0
    s = cur.update(s, passes=3, attempts=8)  # window: 11 / 16 = 0.69 < 0.75
    assert s.level == 0
    s = cur.update(s, passes=7, attempts=8)  # window (last 2): 10 / 16 = 0.625
    assert s.level == 0 and s.pass_rate == pytest.approx(0.625)
    s = cur.update(s, passes=8, attempts=8)  # 15 / 16: advance, window restarts
    assert s.level == 1 and s.pass_rate is None and s.entered_at == (0, 4)
    s = cur.update(s, passes=16, attempts=16)
    assert s.level == 2 and s.entered_at == (0, 4, 5)  # 16 attempts at 100% suffice
    for _ in range(3):
        s = cur.update(s, passes=16, attempts=16)
    assert s.level == 2 and s.updates == 8  # the last level is never left
    with pytest.raises(ValueError, match="passes=5, attempts=4"):
        cur.update(s, 5, 4)


def test_temperature_rises_on_plateau_and_stops_at_the_cap():
    ctl = PlateauTemperature(initial=1.0, max_temperature=1.2, step=0.1, patience=2,
                             min_delta=0.01, smoothing=0.0)
    s = ctl.init()
    temps = []
    for r in [0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]:
        s = ctl.update(s, r)
        temps.append(round(s.temperature, 6))
    # Improving: unchanged; 2 flat updates: +0.1; 2 more: +0.1 (the cap); then stays.
    assert temps == [1.0, 1.0, 1.0, 1.0, 1.1, 1.1, 1.2, 1.2, 1.2, 1.2, 1.2, 1.2, 1.2]
    assert PlateauTemperature.restart(s) == TemperatureState(s.temperature)


def test_a_falling_reward_is_a_plateau_too_and_smoothing_delays_it():
    ctl = PlateauTemperature(initial=0.8, max_temperature=1.0, step=0.1, patience=3,
                             smoothing=0.5)
    s = ctl.init()
    for r in [0.5, 0.4, 0.3]:
        s = ctl.update(s, r)
    assert s.temperature == 0.8 and s.stale == 2 and s.smoothed == pytest.approx(0.375)
    s = ctl.update(s, 0.2)
    assert s.temperature == pytest.approx(0.9) and s.stale == 0


def _run(cur, temp, cs, ts, rewards):
    for r in rewards:
        cs = cur.update(cs, passes=round(r * 32), attempts=32)
        level = cs.level
        ts = temp.update(ts, r)
        if cs.level != level:
            ts = temp.restart(ts)
    return cs, ts


def test_state_round_trips_through_json_for_exact_resume():
    cur = Curriculum(num_levels=4, threshold=0.6, window=3, min_attempts=64)
    temp = PlateauTemperature(patience=2, smoothing=0.7, step=0.07, max_temperature=1.25)
    rewards = [0.2, 0.45, 0.61, 0.7, 0.66, 0.31, 0.3, 0.29, 0.3, 0.65, 0.8, 0.8, 0.8, 0.81]
    straight = _run(cur, temp, cur.init(), temp.init(), rewards)
    cs, ts = _run(cur, temp, cur.init(), temp.init(), rewards[:7])
    saved = json.dumps({"curriculum": cs.to_dict(), "temperature": ts.to_dict()})
    loaded = json.loads(saved)
    cs = CurriculumState.from_dict(loaded["curriculum"])
    ts = TemperatureState.from_dict(loaded["temperature"])
    resumed = _run(cur, temp, cs, ts, rewards[7:])
    assert resumed == straight
    assert straight[0].level > 0 and straight[1].temperature > temp.initial  # the run moved


def test_bad_constants_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        Curriculum(num_levels=2, threshold=1.5)
    with pytest.raises(ValueError, match="initial <= max_temperature"):
        PlateauTemperature(initial=1.5, max_temperature=1.2)
