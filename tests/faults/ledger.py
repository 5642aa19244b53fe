"""The ledger: every event the test published (id → audience) and what each client received."""

from __future__ import annotations

from dataclasses import dataclass, field

BROADCAST = "*"  # the audience of a broadcast event: every user


@dataclass
class Counts:
    """One scenario's tally, over all clients."""

    scenario: str
    published: int = 0  # events acknowledged to the publisher (distinct ids)
    expected: int = 0  # (client, event) pairs that had to arrive
    delivered: int = 0  # (client, event) frames received, duplicates included
    duplicates: int = 0  # frames removed by id de-duplication
    missing: int = 0  # expected (client, event) pairs that never arrived
    misdelivered: int = 0  # frames for another user's event
    unknown: int = 0  # frames whose id the publisher was never given (e.g. an event stored twice)
    out_of_order: int = 0  # clients whose de-duplicated ids were not strictly rising
    reconnects: int = 0  # connections the clients opened after their first
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.misdelivered or self.unknown or self.out_of_order)

    HEADER = (
        f"{'scenario':<34} {'published':>9} {'expected':>8} {'delivered':>9} {'dups':>5} "
        f"{'missing':>7} {'misdeliv':>8} {'unknown':>7} {'order':>5} {'reconn':>6} {'secs':>6}"
    )

    def row(self) -> str:
        return (
            f"{self.scenario:<34} {self.published:>9} {self.expected:>8} {self.delivered:>9} "
            f"{self.duplicates:>5} {self.missing:>7} {self.misdelivered:>8} {self.unknown:>7} "
            f"{self.out_of_order:>5} {self.reconnects:>6} {self.seconds:>6.1f}"
        )


class Ledger:
    """What was published: wire id → audience (a user id or BROADCAST), in the order acknowledged."""

    def __init__(self) -> None:
        self.audience: dict[int, str] = {}
        self.logical: dict[int, int] = {}  # id → the publisher's sequence number (one per event)
        self.conflicts: list[tuple[int, str, str]] = []  # one id acknowledged for two events

    def record(self, event_id: int, audience: str, n: int) -> None:
        previous = self.audience.get(event_id)
        if previous not in (None, audience):
            self.conflicts.append((event_id, previous, audience))
        self.audience[event_id] = audience
        self.logical[event_id] = n

    def meant_for(self, user: str) -> list[int]:
        return sorted(i for i, a in self.audience.items() if a in (user, BROADCAST))

    def tally(self, scenario: str, received: dict[str, tuple[str, list[int]]], reconnects: int = 0) -> Counts:
        """``received``: client name → (its user, every id it got, in arrival order)."""
        counts = Counts(scenario, published=len(self.audience), reconnects=reconnects)
        for name, (user, ids) in received.items():
            counts.delivered += len(ids)
            seen: set[int] = set()
            unique: list[int] = []
            for i in ids:
                if i in seen:
                    counts.duplicates += 1
                    continue
                seen.add(i)
                unique.append(i)
            wanted = self.meant_for(user)
            counts.expected += len(wanted)
            mine = [i for i in unique if i in self.audience and self.audience[i] in (user, BROADCAST)]
            foreign = [i for i in unique if i in self.audience and i not in set(mine)]
            strays = [i for i in unique if i not in self.audience]
            counts.misdelivered += len(foreign)
            counts.unknown += len(strays)
            missing = sorted(set(wanted) - set(mine))
            counts.missing += len(missing)
            if unique != sorted(unique) or mine != [i for i in wanted if i in seen]:
                counts.out_of_order += 1
            if missing and len(counts.notes) < 5:
                counts.notes.append(
                    f"{name} ({user}) missed {missing[:10]}{'…' if len(missing) > 10 else ''}"
                )
            if (foreign or strays) and len(counts.notes) < 5:
                counts.notes.append(f"{name} ({user}) got foreign {foreign[:5]} unknown {strays[:5]}")
        return counts


RESULTS: list[Counts] = []


def table(rows: list[Counts]) -> str:
    lines = [Counts.HEADER, *(r.row() for r in rows)]
    for r in rows:
        lines.extend(f"  {r.scenario}: {note}" for note in r.notes)
    return "\n".join(lines)
