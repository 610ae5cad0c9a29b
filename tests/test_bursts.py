"""The burst log: the first event at once, the rest counted, at an interval that lengthens while the burst lasts."""

from __future__ import annotations

import asyncio
import logging
import re

from shardnet.runtimes.bursts import BurstLog

logger = logging.getLogger("shardnet.tests.bursts")


def said(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == logger.name]


def intervals(lines: list[str]) -> list[float]:
    return [float(match.group(1)) for line in lines if (match := re.search(r"within ([0-9.]+)s", line))]


async def test_a_lasting_burst_is_said_less_and_less_often_and_a_new_one_at_once_again(caplog, eventually):
    """A burst that never ends (every replica gone for a month) was a line a second for ever, some 0.8 GB of log a
    month per process (a review): each line of a burst doubles the interval to the next, up to ``longest``; a
    quiet of two whole intervals ends the burst, and the next event is logged at once, at the short interval."""
    caplog.set_level(logging.WARNING, logger=logger.name)
    burst = BurstLog(logger, "dep", "%s: %d more within %gs (%s); the latest: %s", interval=0.05, longest=0.2)
    counted = 0

    async def events_until(lines: int) -> None:
        nonlocal counted
        while len(said(caplog)) < lines:
            counted += 1
            burst.note("kind", f"event {counted}", "%s: event %d", "dep", counted)
            await asyncio.sleep(0.005)

    await asyncio.wait_for(events_until(6), timeout=30)
    lines = said(caplog)
    assert lines[0] == "dep: event 1", lines
    assert intervals(lines[1:6]) == [0.05, 0.1, 0.2, 0.2, 0.2], lines
    await eventually(lambda: burst._flush is None, timeout=5.0)  # the last held events said
    held_lines = len(said(caplog))
    await asyncio.sleep(0.45)  # the quiet the burst's end is: two of its (longest) intervals
    burst.note("kind", "after the quiet", "%s: %s", "dep", "after the quiet")
    assert said(caplog)[held_lines:] == ["dep: after the quiet"]
    before = len(said(caplog))
    await asyncio.wait_for(events_until(before + 1), timeout=30)
    assert intervals(said(caplog)[before:before + 1]) == [0.05], said(caplog)  # short again
    burst.close()
    total = sum(int(re.search(r": (\d+) more", line).group(1)) for line in said(caplog) if " more " in line)
    assert total + 2 == counted + 1, (total, counted)  # every event said or counted, none twice


async def test_events_a_little_sparser_than_the_interval_still_lengthen_it(caplog):
    """One event every 1.5 intervals came after a whole interval each time, was logged in full and reset the
    interval: a line per event for ever (a regression review). The interval still doubles (the gaps are shorter
    than two intervals), until events are held and counted."""
    caplog.set_level(logging.WARNING, logger=logger.name)
    burst = BurstLog(logger, "dep", "%s: %d more within %gs (%s); the latest: %s", interval=0.2, longest=0.8)
    events = 8
    for index in range(events):
        burst.note("kind", f"event {index}", "%s: event %d", "dep", index)
        await asyncio.sleep(0.3)
    burst.close()
    lines = said(caplog)
    assert lines[:2] == ["dep: event 0", "dep: event 1"], lines  # 0.3 s apart: each past the 0.2 s interval
    assert len(lines) < events and max(intervals(lines)) >= 0.4, lines  # then held: counted, less often
    total = sum(int(re.search(r": (\d+) more", line).group(1)) for line in lines if " more " in line)
    assert total + sum(" more " not in line for line in lines) == events, lines
