"""When an agent counts its inference server as down (and stops taking jobs) or up again."""

from __future__ import annotations

from services.agent.watchdog import UpstreamHealth


def verdicts(checks: list[bool], failures: int = 2) -> list[bool]:
    health = UpstreamHealth(failures)
    return [health.record(passed) for passed in checks]


def test_healthy_until_two_checks_in_a_row_fail() -> None:
    assert UpstreamHealth().healthy
    assert verdicts([True, False, False, False]) == [True, True, False, False]


def test_one_failed_check_between_passing_ones_is_a_blip() -> None:
    assert all(verdicts([False, True, False, True, False]))


def test_up_again_at_the_first_passing_check() -> None:
    assert verdicts([False, False, True, False]) == [True, False, True, True]


def test_the_number_of_failures_is_configurable() -> None:
    assert verdicts([False], failures=1) == [False]
    assert verdicts([False, False, False], failures=3) == [True, True, False]
