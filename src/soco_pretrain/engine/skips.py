"""The one log of images skipped at training or evaluation time (they failed to decode).

Every stage reports a file it could not read and goes on: ``update(pairs)`` takes ``(path,
reason)`` pairs as the loaders hand them over, counts every skip (a bad file is met again each
epoch) and, with ``warn=True``, prints one line the first time a file is met (the pretraining
dataset warns in its worker already). ``summary()`` lists them at the end; the state round-trips
through checkpoints so a resumed run still lists the files the first part met.
"""

from __future__ import annotations

from collections import Counter


class SkipLog:
    def __init__(self, warn: bool = False):
        self.warn = warn
        self.counts: Counter = Counter()
        self.reasons: dict[str, str] = {}

    def update(self, pairs) -> list[tuple[str, str]]:
        """Record ``(path, reason)`` pairs (or a pretraining batch's ``skipped`` field); returns the
        files met for the first time."""
        if isinstance(pairs, dict):
            pairs = pairs["skipped"]
        new = []
        for path, reason in pairs:
            path = str(path)
            if path not in self.reasons:
                self.reasons[path] = reason
                new.append((path, reason))
                if self.warn:
                    print(f"soco: warning: skipped {path}: {reason}", flush=True)
            self.counts[path] += 1
        return new

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    @property
    def files(self) -> list[tuple[str, str]]:
        return sorted(self.reasons.items())

    def __len__(self) -> int:
        return len(self.reasons)

    def summary(self, what: str = "skipped images", max_listed: int = 20) -> str:
        if not self.reasons:
            return f"{what}: none"
        lines = [f"{what}: {self.count} times, {len(self.reasons)} files (failed to decode):"]
        for path, reason in self.files[:max_listed]:
            times = self.counts[path]
            lines.append(f"  {path}: {reason}" + (f" (x{times})" if times > 1 else ""))
        if len(self.reasons) > max_listed:
            lines.append(f"  ... and {len(self.reasons) - max_listed} more")
        return "\n".join(lines)

    def state_dict(self) -> dict:
        return {"reasons": dict(self.reasons), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.reasons = dict(state.get("reasons", {}))
        self.counts = Counter(state.get("counts", {p: 1 for p in self.reasons}))
