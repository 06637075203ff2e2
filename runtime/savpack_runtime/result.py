"""The per-item result record, one for every consumer: the runtime's Classifier, the builder's classify, the CLIs.

`Result.to_dict()` is the JSON record (label, votes, shares, probabilities, calibrated, abstained; per pack when a
bundle holds several). Build records only through `results_from_decisions`: code that passes `to_dict()` through gets
every field a later version adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

from .errors import InputError
from .scoring import Decision

SHARE_DECIMALS = 6
# Probabilities in records keep 7 decimals: thresholds people set are coarser, and runs on two machines (or the
# graph's float32 against numpy's float64) agree to that precision.
PROBABILITY_DECIMALS = 7


@dataclass(frozen=True)
class PackResult:
    """One pack's decision for one item. label is None when the pack abstained (top probability below the
    threshold asked for); calibrated is False for a format-1 pack, whose probabilities are the vote shares."""

    label: str | None
    votes: dict[str, int]  # heads voting for each class
    shares: dict[str, float]  # votes / k
    probabilities: dict[str, float]
    calibrated: bool = True
    abstained: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "votes": self.votes,
                "shares": {key: round(value, SHARE_DECIMALS) for key, value in self.shares.items()},
                "probabilities": {key: round(value, PROBABILITY_DECIMALS) for key, value in self.probabilities.items()},
                "calibrated": self.calibrated, "abstained": self.abstained}


@dataclass(frozen=True)
class Result:
    """The first pack's fields; `by_pack` holds every pack's result by pack name."""

    label: str | None
    votes: dict[str, int]
    shares: dict[str, float]
    probabilities: dict[str, float]
    calibrated: bool = True
    abstained: bool = False
    by_pack: dict[str, PackResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        record = self.top().to_dict()
        if len(self.by_pack) > 1:
            record["packs"] = {name: result.to_dict() for name, result in self.by_pack.items()}
        return record

    def top(self) -> PackResult:
        return PackResult(self.label, self.votes, self.shares, self.probabilities, self.calibrated, self.abstained)

    def select(self, packs: Sequence[str]) -> "Result":
        """This result as a bundle holding only `packs` would give it: the first named pack's result on top."""
        unknown = [name for name in packs if name not in self.by_pack]
        if not packs or unknown:
            raise InputError(f"packs {unknown or list(packs)} are not in this bundle's result; it holds {list(self.by_pack)}")
        by_pack = {name: self.by_pack[name] for name in packs}
        first = by_pack[packs[0]]
        return replace(self, **{item.name: getattr(first, item.name) for item in fields(first)}, by_pack=by_pack)


def pack_results(labels: Sequence[str], decision: Decision) -> list[PackResult]:
    """One pack's decision over a batch (B items) -> B records, class names from `labels` (index = class id)."""
    votes = decision.votes
    return [
        PackResult(None if decision.abstained[row] else labels[int(decision.predictions[row])],
                   {label: int(count) for label, count in zip(labels, votes.votes[row])},
                   {label: float(share) for label, share in zip(labels, votes.shares[row])},
                   {label: float(p) for label, p in zip(labels, decision.probabilities[row])},
                   decision.calibrated, bool(decision.abstained[row]))
        for row in range(len(decision.predictions))
    ]


def results_from_decisions(decisions_by_pack: Mapping[str, tuple[Sequence[str], Decision]]) -> list[Result]:
    """{pack name: (labels, decision over the same B items)} -> B results; the first pack gives the top-level fields."""
    per_pack = {name: pack_results(labels, decision) for name, (labels, decision) in decisions_by_pack.items()}
    rows = len(next(iter(per_pack.values())))
    results = []
    for row in range(rows):
        by_pack = {name: records[row] for name, records in per_pack.items()}
        first = next(iter(by_pack.values()))
        results.append(Result(first.label, first.votes, first.shares, first.probabilities, first.calibrated,
                              first.abstained, by_pack))
    return results


# Two runs of the same bundle on the same items agree to this: a batch of other items pads a prompt differently, which
# moves head vectors in their last float bits, and a small temperature carries that into the probabilities.
AGREEMENT_TOLERANCE = 1e-5


def records_agree(actual: Any, expected: Any, tolerance: float = AGREEMENT_TOLERANCE) -> bool:
    """Whether two records (to_dict() output, or rows of a results file) say the same: labels, votes, sources and
    flags exactly; floats (shares, probabilities) within `tolerance`. Nested dicts and lists compare element-wise."""
    if isinstance(expected, PackResult | Result):
        expected = expected.to_dict()
    if isinstance(actual, PackResult | Result):
        actual = actual.to_dict()
    if isinstance(expected, dict):
        return isinstance(actual, dict) and actual.keys() == expected.keys() and \
            all(records_agree(actual[key], expected[key], tolerance) for key in expected)
    if isinstance(expected, (list, tuple)):
        return isinstance(actual, (list, tuple)) and len(actual) == len(expected) and \
            all(records_agree(a, e, tolerance) for a, e in zip(actual, expected))
    if isinstance(expected, float) and not isinstance(actual, bool) and isinstance(actual, (int, float)):
        return abs(actual - expected) <= tolerance
    return type(actual) is type(expected) and actual == expected
