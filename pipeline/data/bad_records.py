"""Counting skipped records on a training worker (no Ray): a count, the first keys, and a few log lines."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BadRecordLog:
    """What one worker saw of skipped records: a count, the first keys, and a few log lines (not one per record)."""

    count: int = 0
    first_keys: list[str] = field(default_factory=list)
    max_keys: int = 10
    max_log_lines: int = 5
    _logged: int = 0

    def add(self, keys) -> None:
        self.count += len(keys)
        room = self.max_keys - len(self.first_keys)
        if room > 0:
            self.first_keys.extend(str(k) for k in keys[:room])
        for key in keys[: max(0, self.max_log_lines - self._logged)]:
            self._logged += 1
            more = " (further bad records are counted, not logged)" if self._logged == self.max_log_lines else ""
            print(f"[byol] WARNING: skipping bad record {key}{more}", flush=True)
