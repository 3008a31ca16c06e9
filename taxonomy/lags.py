"""Sets of lags: which past steps of a variable something depends on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LagSet:
    """The lags `finite` plus, when `tail` is set, every lag from `tail` on.

    Lag 0 is the current step, lag k is k steps back. A tail stands for the
    whole history, which is what an RNN state carries.
    """

    finite: frozenset[int] = frozenset()
    tail: int | None = None

    @classmethod
    def span(cls, oldest: int | None, newest: int) -> "LagSet":
        """The lags of a reference: `newest` to `oldest`, or on to step 1 when oldest is None."""
        if oldest is None:
            return cls(frozenset(), newest)
        return cls(frozenset(range(newest, oldest + 1)))

    def normalised(self) -> "LagSet":
        if self.tail is None:
            return self
        return LagSet(frozenset(lag for lag in self.finite if lag < self.tail), self.tail)

    def __or__(self, other: "LagSet") -> "LagSet":
        tails = [tail for tail in (self.tail, other.tail) if tail is not None]
        return LagSet(self.finite | other.finite, min(tails) if tails else None).normalised()

    def shifted(self, by: int) -> "LagSet":
        """The lags seen from `by` steps later."""
        return LagSet(frozenset(lag + by for lag in self.finite),
                      None if self.tail is None else self.tail + by)

    def as_history(self) -> "LagSet":
        """Every lag from the smallest one on: what a recurrence over these inputs carries."""
        smallest = self.smallest()
        return LagSet(frozenset(), smallest) if smallest is not None else self

    def smallest(self) -> int | None:
        candidates = list(self.finite) + ([self.tail] if self.tail is not None else [])
        return min(candidates) if candidates else None

    def __contains__(self, lag: int) -> bool:
        return lag in self.finite or (self.tail is not None and lag >= self.tail)

    def __bool__(self) -> bool:
        return bool(self.finite) or self.tail is not None

    @property
    def unbounded(self) -> bool:
        return self.tail is not None

    def order(self) -> int | str | None:
        """The largest lag, "all" for the whole history, None when empty."""
        if self.tail is not None:
            return "all"
        return max(self.finite) if self.finite else None

    def lags_up_to(self, limit: int) -> list[int]:
        """The lags as a sorted list, with a tail cut off at `limit`."""
        lags = set(self.finite)
        if self.tail is not None:
            lags.update(range(self.tail, max(limit, self.tail) + 1))
        return sorted(lag for lag in lags if lag <= limit)

    def describe(self, name: str) -> str:
        """Spec notation, such as `z[t-3:t-1]` or `x[1:t-1]`."""
        def step(lag: int) -> str:
            return "t" if lag == 0 else (f"t-{lag}" if lag > 0 else f"t+{-lag}")

        parts = []
        finite = sorted(self.finite, reverse=True)
        runs: list[list[int]] = []
        for lag in finite:
            if runs and runs[-1][-1] == lag + 1:
                runs[-1].append(lag)
            else:
                runs.append([lag])
        for run in runs:
            oldest, newest = run[0], run[-1]
            parts.append(f"{name}[{step(oldest)}]" if oldest == newest
                         else f"{name}[{step(oldest)}:{step(newest)}]")
        if self.tail is not None:
            parts.insert(0, f"{name}[1:{step(self.tail)}]")
        return ", ".join(parts)
