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
    whole interval without an event ends the burst, and the next is logged at once, at the short interval."""
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
    await asyncio.sleep(0.25)  # the quiet the burst's end is: longer than its (longest) interval
    burst.note("kind", "after the quiet", "%s: %s", "dep", "after the quiet")
    assert said(caplog)[held_lines:] == ["dep: after the quiet"]
    before = len(said(caplog))
    await asyncio.wait_for(events_until(before + 1), timeout=30)
    assert intervals(said(caplog)[before:before + 1]) == [0.05], said(caplog)  # short again
    burst.close()
    total = sum(int(re.search(r": (\d+) more", line).group(1)) for line in said(caplog) if " more " in line)
    assert total + 2 == counted + 1, (total, counted)  # every event said or counted, none twice
