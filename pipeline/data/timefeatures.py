"""Calendar features of timestamps: where in the day and in the week a window starts."""

from __future__ import annotations

import numpy as np

DAY_NS = 86_400 * 10**9
WEEK_NS = 7 * DAY_NS
_EPOCH_WEEKDAY_OFFSET_NS = 3 * DAY_NS  # 1970-01-01 was a Thursday: shift so Monday = 0


def calendar_features(time_ns: np.ndarray) -> np.ndarray:
    """sin/cos of the time of day and of the day of week, float32 [..., 4], from int64 ns UTC."""
    t = np.asarray(time_ns, dtype=np.int64)
    day = (t % DAY_NS) / DAY_NS * 2 * np.pi
    week = ((t + _EPOCH_WEEKDAY_OFFSET_NS) % WEEK_NS) / WEEK_NS * 2 * np.pi
    return np.stack([np.sin(day), np.cos(day), np.sin(week), np.cos(week)], -1).astype(np.float32)
