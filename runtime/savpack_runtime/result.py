"""The per-item result record, one for every consumer: the runtime's Classifier, the builder's classify, the CLIs.

`Result.to_dict()` is the JSON record (label, votes, shares; per pack when a bundle holds several). Build records
only through `results_from_votes`: code that passes `to_dict()` through gets every field a later version adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

from .errors import InputError
from .vote import Votes

SHARE_DECIMALS = 6


@dataclass(frozen=True)
class PackResult:
    """One pack's decision for one item."""

    label: str
    votes: dict[str, int]  # heads voting for each class
    shares: dict[str, float]  # votes / k

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "votes": self.votes,
                "shares": {key: round(value, SHARE_DECIMALS) for key, value in self.shares.items()}}


@dataclass(frozen=True)
class Result:
    """The first pack's label, votes and shares; `by_pack` holds every pack's result by pack name."""

    label: str
    votes: dict[str, int]
    shares: dict[str, float]
    by_pack: dict[str, PackResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        record = PackResult(self.label, self.votes, self.shares).to_dict()
        if len(self.by_pack) > 1:
            record["packs"] = {name: result.to_dict() for name, result in self.by_pack.items()}
        return record

    def select(self, packs: Sequence[str]) -> "Result":
        """This result as a bundle holding only `packs` would give it: the first named pack's result on top."""
        unknown = [name for name in packs if name not in self.by_pack]
        if not packs or unknown:
            raise InputError(f"packs {unknown or list(packs)} are not in this bundle's result; it holds {list(self.by_pack)}")
        by_pack = {name: self.by_pack[name] for name in packs}
        first = by_pack[packs[0]]
        return replace(self, **{item.name: getattr(first, item.name) for item in fields(first)}, by_pack=by_pack)


def pack_results(labels: Sequence[str], votes: Votes) -> list[PackResult]:
    """One pack's vote over a batch (B items) -> B records, class names from `labels` (index = class id)."""
    return [
        PackResult(labels[int(votes.predictions[row])],
                   {label: int(count) for label, count in zip(labels, votes.votes[row])},
                   {label: float(share) for label, share in zip(labels, votes.shares[row])})
        for row in range(len(votes.predictions))
    ]


def results_from_votes(votes_by_pack: Mapping[str, tuple[Sequence[str], Votes]]) -> list[Result]:
    """{pack name: (labels, votes over the same B items)} -> B results; the first pack gives the top-level fields."""
    per_pack = {name: pack_results(labels, votes) for name, (labels, votes) in votes_by_pack.items()}
    rows = len(next(iter(per_pack.values())))
    results = []
    for row in range(rows):
        by_pack = {name: records[row] for name, records in per_pack.items()}
        first = next(iter(by_pack.values()))
        results.append(Result(first.label, first.votes, first.shares, by_pack))
    return results
