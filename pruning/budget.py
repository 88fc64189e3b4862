"""How many visual tokens a pruning run keeps: a fraction pruned (0.5) or a count kept (keep=144)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """Exactly one of `pruned` (fraction of the visual tokens removed, in [0, 1)) or `kept` (tokens kept, >= 1)."""

    pruned: float | None = None
    kept: int | None = None

    def __post_init__(self) -> None:
        if (self.pruned is None) == (self.kept is None):
            raise ValueError("a budget is either a fraction pruned or a number of tokens kept, not both or neither")
        if self.pruned is not None and not 0.0 <= self.pruned < 1.0:
            raise ValueError(f"a fraction pruned must lie in [0, 1), got {self.pruned}")
        if self.kept is not None and self.kept < 1:
            raise ValueError(f"a number of tokens kept must be >= 1, got {self.kept}")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """`0.5` (fraction pruned) or `keep=144` (tokens kept)."""
        text = text.strip()
        try:
            if text.startswith("keep="):
                return cls(kept=int(text.removeprefix("keep=")))
            return cls(pruned=float(text))
        except ValueError as error:
            if "budget" in str(error) or "must" in str(error):
                raise
            raise ValueError(f"budget {text!r}: need a fraction pruned such as 0.5, or keep=N") from None

    def num_kept(self, num_visual: int) -> int:
        """Tokens to keep out of `num_visual`: at least 1, at most all of them."""
        if self.kept is not None:
            return min(self.kept, num_visual)
        return max(1, min(num_visual, round((1.0 - self.pruned) * num_visual)))

    @property
    def is_unpruned(self) -> bool:
        return self.pruned == 0.0

    def __str__(self) -> str:
        return f"keep={self.kept}" if self.kept is not None else f"{self.pruned:g}"


def parse_budgets(text: str) -> list[Budget]:
    """Comma-separated budgets, e.g. `0,0.25,0.5,keep=64`."""
    budgets = [Budget.parse(part) for part in text.split(",") if part.strip()]
    if not budgets:
        raise ValueError("give at least one budget, e.g. 0.5 or keep=144")
    return budgets
