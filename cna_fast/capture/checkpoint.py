"""Periodic, atomic saves of a capture's running statistics and stream position, for exact resumes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CNAError, positive_int
from ..stats import Stats, load_stats

DEFAULT_EVERY = 10_000


@dataclass
class Checkpoint:
    """Where and how often a capture saves its progress, and what it was computed from.

    path: the statistics file (safetensors). every: prompts between saves; saves happen at the
    end of a tokenization window (32 x batch_size prompts), so a save happens every
    max(every, 32 x batch_size) prompts at most, and a resumed run builds exactly the same batches
    as an uninterrupted one and ends with bit-identical statistics.
    identity: what the run is computed from (model, capture settings, input hashes); resuming
    from a checkpoint with a different identity is an error. `discover` fills it in.
    resume: continue from the file when it exists.
    """

    path: Path
    every: int = DEFAULT_EVERY
    identity: dict | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        positive_int(self.every, "checkpoint every (prompts between saves)")

    def for_rank(self, rank: int, world: int) -> "Checkpoint":
        """This checkpoint for one rank of a distributed run: its own file and identity."""
        return Checkpoint(self.path.with_name(f"{self.path.name}.rank{rank}"), self.every,
                          {**self.identity, "rank": rank, "world": world}, self.resume)

    def restore(self) -> tuple[Stats, int] | None:
        """The saved statistics and how many prompts they cover, when resuming from an existing checkpoint."""
        if not self.resume or not self.path.exists():
            return None
        stats = load_stats(self.path)
        saved = stats.meta.get("identity")
        if saved != self.identity:
            changed = sorted(key for key in set(saved or {}) | set(self.identity)
                             if (saved or {}).get(key) != self.identity.get(key))
            raise CNAError(f"checkpoint {str(self.path)!r} was computed from different inputs or settings "
                           f"({', '.join(changed)} changed): resume with the original ones, or start over "
                           "without --resume")
        consumed = stats.meta.get("consumed")
        if isinstance(consumed, bool) or not isinstance(consumed, int) or consumed < 0:
            raise CNAError(f"checkpoint {str(self.path)!r} is damaged (its prompt count {consumed!r} is not a "
                           "count): delete it and start over without --resume")
        return stats, consumed

    def save(self, stats: Stats, consumed: int) -> None:
        stats.meta = {"identity": self.identity, "consumed": consumed}
        stats.save(self.path)
