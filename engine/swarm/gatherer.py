"""The aggregation site's ``Gatherer``: which submissions to admit, when a round is complete, the aggregate.

It holds no state of its own beyond what the aggregator's ``swarm_round`` machine
recorded (grants, accepted results, absent trainers), so an aggregation site that
restarts rebuilds it from its log and goes on gathering with the results it already
has (their chunks are in its store, named by hash), not from zero.

The reference's method names are kept: ``can_accept_submission`` (may this trainer
submit now: at most ``max_concurrent_submissions`` permissions outstanding),
``gather`` (take one accepted result), ``is_done`` (every trainer answered; or
``min_responses_required`` are in and ``wait_time_after_min_resps_received``
passed; or ``learn_task_timeout`` passed) and ``aggregate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ConfigError
from engine.swarm.config import SwarmConfig

__all__ = ["Gatherer", "Submission"]

US = 1_000_000


@dataclass(frozen=True)
class Submission:
    """One trainer's accepted result: its manifest (in the aggregator's store), example count, metric."""

    site: str
    model: str
    n: float
    metric: float | None


@dataclass
class Gatherer:
    """One round's gathering on the aggregation site."""

    config: SwarmConfig
    round: int
    trainers: list[str]
    #: site -> time (µs) its permission to submit was granted
    grants: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, Submission] = field(default_factory=dict)
    #: trainers that did not acknowledge the round's learn task (gone): not waited for
    absent: set[str] = field(default_factory=set)

    @classmethod
    def from_events(cls, config: SwarmConfig, round_: int, trainers: list[str],
                    events: list[tuple[str, dict[str, Any], int]]) -> Gatherer:
        """Rebuild from the aggregator machine's events: (trigger, data, time in µs)."""
        g = cls(config, round_, list(trainers))
        for trigger, data, ts in events:
            if trigger == "grant":
                g.grants[str(data["site"])] = ts
            elif trigger == "accept":
                g.gather(Submission(str(data["site"]), str(data["result"]), float(data["n"]), data.get("metric")))
            elif trigger == "note_absent":
                g.absent.update(str(s) for s in data["sites"])
        return g

    # -- admission -----------------------------------------------------------------------------

    def can_accept_submission(self, site: str, now_us: int) -> str:
        """``ok`` (grant it), ``granted`` (already holds a slot), ``duplicate``, ``busy`` or ``unknown_trainer``."""
        if site not in self.trainers:
            return "unknown_trainer"
        if site in self.accepted:
            return "duplicate"
        if site in self.grants and now_us - self.grants[site] < self.config.grant_timeout * US:
            return "granted"
        if len(self.outstanding(now_us)) >= self.config.max_concurrent_submissions:
            return "busy"
        return "ok"

    def outstanding(self, now_us: int) -> list[str]:
        """Trainers holding an unexpired permission and not yet accepted."""
        limit = self.config.grant_timeout * US
        return [s for s, at in self.grants.items() if s not in self.accepted and now_us - at < limit]

    def gather(self, submission: Submission) -> bool:
        """Take one accepted result; False if this trainer's result is already in (counted once)."""
        if submission.site in self.accepted:
            return False
        self.accepted[submission.site] = submission
        return True

    # -- completion ----------------------------------------------------------------------------------

    def expected(self) -> list[str]:
        """The trainers still expected to answer (absent ones are not)."""
        return [s for s in self.trainers if s not in self.absent]

    def all_received(self) -> bool:
        return all(s in self.accepted for s in self.expected())

    def min_reached(self) -> bool:
        return len(self.accepted) >= self.config.min_responses_required

    def unreachable_reason(self) -> str | None:
        """Why this round can never reach ``min_responses_required`` (too many trainers gone), else None."""
        could = len(self.accepted) + len([s for s in self.expected() if s not in self.accepted])
        if could >= self.config.min_responses_required:
            return None
        gone = sorted(self.absent)
        return (f"round {self.round}: min_responses_required={self.config.min_responses_required} cannot be met: "
                f"{len(self.accepted)} result(s) in and {could - len(self.accepted)} trainer(s) left to answer; "
                f"gone: {', '.join(gone) or 'none'}")

    def is_done(self, state: str, now_us: int, deadline_us: int | None) -> str | None:
        """The trigger that ends gathering now (``all_received``, ``min_reached``, ``wait_elapsed``,
        ``timeout``) or None to keep waiting; ``state`` is ``gathering`` or ``min_received``."""
        if self.accepted and self.all_received():
            return "all_received"
        if deadline_us is not None and now_us >= deadline_us:
            return "wait_elapsed" if state == "min_received" else "timeout"
        if state == "gathering" and self.min_reached():
            return "min_reached"
        return None

    # -- aggregation ------------------------------------------------------------------------------------

    def aggregate(self, load: Callable[[str], Any], combine: Callable[[dict[str, Any]], Any] | None = None
                  ) -> tuple[Any, list[str], float, float | None]:
        """(aggregate state_dict, sites counted, total n, n-weighted metric) of the accepted results.

        ``load`` reads a manifest from the local store as tensors; ``combine`` replaces
        the default weighted mean (``{site: (state_dict, n)}`` -> state_dict).
        """
        if not self.accepted:
            raise ConfigError(f"round {self.round}: nothing to aggregate")
        from engine.workflows.builtin import weighted_mean_tensors

        sites = sorted(self.accepted)
        updates = {s: {"model": load(self.accepted[s].model), "n": self.accepted[s].n} for s in sites}
        if combine is None:
            mean, counted, total = weighted_mean_tensors(updates)
        else:
            mean = combine({s: (u["model"], u["n"]) for s, u in updates.items()})
            counted, total = sites, float(sum(u["n"] for u in updates.values()))
        metrics = [(float(sub.metric), sub.n) for sub in (self.accepted[s] for s in sites) if sub.metric is not None]
        weight = sum(n for _, n in metrics)
        metric = sum(m * n for m, n in metrics) / weight if metrics and weight > 0 else None
        return mean, counted, total, metric
