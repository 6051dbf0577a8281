"""core.schedules: stage selection per timestep, presets, and percent ranges that tile [0, 1]."""
import pytest

from core.schedules import EmbeddingSchedule, PercentRange, check_tiling, percent_of_timestep


@pytest.mark.parametrize("task,switch", [("anonymize", 400), ("hide", 600), ("recover", -1)])
def test_presets(task, switch):
    assert EmbeddingSchedule.preset(task).switch_timestep == switch


def test_official_stage_use():
    anon, hide, rec = (EmbeddingSchedule.preset(t) for t in ("anonymize", "hide", "recover"))
    # docs/method.md §3: anonymization uses c5 for 581..501 and c4 for 481..401, null below
    assert [anon.stage_for(t) for t in (581, 501, 481, 401, 400, 381, 1)] == [5, 5, 4, 4, None, None, None]
    assert [hide.stage_for(t) for t in (791, 701, 691, 601, 600, 591)] == [7, 7, 6, 6, None, None]
    assert [rec.stage_for(t) for t in (981, 501, 1, 0)] == [9, 5, 0, 0]
    with pytest.raises(ValueError):
        EmbeddingSchedule.preset("nope")
    with pytest.raises(ValueError):
        EmbeddingSchedule(1000)


@pytest.mark.parametrize("switch", [-1, 0, 99, 100, 400, 450, 600, 998, 999])
def test_percent_ranges_tile_and_agree_with_stage_for(switch):
    schedule = EmbeddingSchedule(switch)
    ranges = schedule.percent_ranges()
    check_tiling(ranges)
    # every integer timestep falls into exactly one range, and it is the one stage_for picks
    for t in range(1000):
        p = percent_of_timestep(t)
        hits = [r for r in ranges if r.start_percent <= p <= r.end_percent]
        assert len(hits) == 1, (switch, t, hits)
        assert hits[0].stage == schedule.stage_for(t)


def test_tiling_errors_are_caught():
    with pytest.raises(ValueError, match="gap"):
        check_tiling([PercentRange(1, 0.0, 0.4), PercentRange(None, 0.5, 1.0)])
    with pytest.raises(ValueError, match="overlap"):
        check_tiling([PercentRange(1, 0.0, 0.6), PercentRange(None, 0.5, 1.0)])
    with pytest.raises(ValueError, match="reach 1.0"):
        check_tiling([PercentRange(1, 0.0, 0.6)])
    with pytest.raises(ValueError):
        check_tiling([])

