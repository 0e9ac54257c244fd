"""The one log of images skipped at training or evaluation time (they failed to decode).

Every stage reports a file it could not read and goes on: ``update(pairs)`` takes ``(path,
reason)`` pairs as the loaders hand them over, counts every skip (a bad file is met again each
epoch) and, with ``warn=True``, prints one line the first time a file is met (the pretraining
dataset warns in its worker already). ``summary()`` lists them at the end; the state round-trips
through checkpoints so a resumed run still lists the files the first part met.

A pretraining batch's ``rerouted`` pairs are counted apart: images that decoded to another size
than the proposal store records (replaced under the same name) and were trained on the whole
image (``views.no_proposals=whole_image``); ``summary()`` says so in one line.
"""

from __future__ import annotations

from collections import Counter


class SkipLog:
    def __init__(self, warn: bool = False):
        self.warn = warn
        self.counts: Counter = Counter()
        self.reasons: dict[str, str] = {}
        self.rerouted: Counter = Counter()  # path -> times served whole (another size than the store's)

    def update(self, pairs) -> list[tuple[str, str]]:
        """Record ``(path, reason)`` pairs (or a pretraining batch's ``skipped`` and ``rerouted``
        fields); returns the files met for the first time."""
        if isinstance(pairs, dict):
            self.rerouted.update(str(path) for path, _ in pairs.get("rerouted", ()))
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

    def rerouted_line(self) -> str:
        """One line counting the images trained on the whole image for their size ('' if none)."""
        if not self.rerouted:
            return ""
        files = sorted(self.rerouted)
        named = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        return (
            f"{len(files)} images decoded to another size than the proposal store records (replaced after the "
            f"proposals were made?), trained on the whole image {sum(self.rerouted.values())} times "
            f"(views.no_proposals=whole_image): {named}; rerun soco proposals to search them again"
        )

    def summary(self, what: str = "skipped images", max_listed: int = 20) -> str:
        rerouted = [self.rerouted_line()] if self.rerouted else []
        if not self.reasons:
            return "\n".join([f"{what}: none", *rerouted])
        lines = [f"{what}: {self.count} times, {len(self.reasons)} files (failed to decode):"]
        for path, reason in self.files[:max_listed]:
            times = self.counts[path]
            lines.append(f"  {path}: {reason}" + (f" (x{times})" if times > 1 else ""))
        if len(self.reasons) > max_listed:
            lines.append(f"  ... and {len(self.reasons) - max_listed} more")
        return "\n".join(lines + rerouted)

    def state_dict(self) -> dict:
        return {"reasons": dict(self.reasons), "counts": dict(self.counts), "rerouted": dict(self.rerouted)}

    def load_state_dict(self, state: dict) -> None:
        self.reasons = dict(state.get("reasons", {}))
        self.counts = Counter(state.get("counts", {p: 1 for p in self.reasons}))
        self.rerouted = Counter(state.get("rerouted", {}))
