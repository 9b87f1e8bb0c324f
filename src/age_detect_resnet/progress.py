"""Progress of a long loop, wherever its output goes.

On a terminal, a tqdm bar. Elsewhere (a log file under nohup, CI, a notebook's captured stderr) tqdm's
bar would be switched off and a 10-minute cache preparation would print nothing, so the loop logs a line
every `interval` seconds instead: how many, the share done, the rate and the time left.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

T = TypeVar("T")

LOG_INTERVAL_S = 30.0


def progress(
    iterable: Iterable[T], *, total: int, desc: str, unit: str = "it", interval: float = LOG_INTERVAL_S
) -> Iterable[T]:
    """`iterable`, reporting how far it has gone: a bar on a terminal, a log line every `interval`
    seconds otherwise (and one at the end of a loop that logged along the way)."""
    if _on_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit)
    return _logged(iterable, total=total, desc=desc, unit=unit, interval=interval)


def _on_terminal() -> bool:
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def _logged(iterable: Iterable[T], *, total: int, desc: str, unit: str, interval: float) -> Iterator[T]:
    start = last = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval and done < total:
            rate = done / max(now - start, 1e-9)
            log.info(
                "%s: %d of %d (%.0f%%), %.1f %s/s, about %s left",
                desc,
                done,
                total,
                100.0 * done / max(total, 1),
                rate,
                unit,
                duration((total - done) / rate),
            )
            last = now
    if last > start:  # only loops long enough to have logged along the way say that they ended
        log.info("%s: %d done in %s", desc, done, duration(time.monotonic() - start))


def duration(seconds: float) -> str:
    """'45 s', '12 min', '2.3 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
