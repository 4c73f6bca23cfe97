"""``fedlog replay DB --job J --round R --aggregate``: re-run a round's aggregation from stored chunks.

The server's log holds each site's accepted result (references to manifests in the
server's chunk store) and the model hash the round published. Re-aggregating loads
those results, averages them exactly as the workflow did (``weighted_mean_tensors``:
float64, site order) and compares the address of the result with the recorded one;
a mismatch names both and the sites that took part. Built-in ``fedavg_torch`` jobs
(and any workflow publishing ``model_hash`` from ``weighted_mean_tensors``) can be
re-aggregated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.chunks import ChunkStore
from engine.errors import ConfigError
from engine.log.recorder import EventRecorder
from engine.tensors import load, pack, refs_in, replace_refs

__all__ = ["Reaggregation", "reaggregate"]


@dataclass(frozen=True)
class Reaggregation:
    job_id: str
    round: int
    sites: list[str]
    recorded_hash: str
    computed_hash: str

    @property
    def matches(self) -> bool:
        return self.recorded_hash == self.computed_hash

    def describe(self) -> str:
        head = f"job {self.job_id} round {self.round}: re-aggregated {len(self.sites)} result(s) ({', '.join(self.sites)})"
        if self.matches:
            return f"{head}: model hash {self.computed_hash} matches the recorded one"
        return (f"{head}: MISMATCH\n  recorded {self.recorded_hash}\n  computed {self.computed_hash}")


def reaggregate(log: EventRecorder, chunks: ChunkStore, job_id: str, round_: int) -> Reaggregation:
    """Re-run the aggregation of ``round_`` of ``job_id`` (see the module docstring)."""
    from engine.workflows.builtin import weighted_mean_tensors

    results: dict[str, Any] = {}
    recorded: str | None = None
    for event in log.read(job_id=job_id):
        if event.round != round_:
            continue
        if event.kind == "client_task" and event.trigger == "result" and isinstance(event.data, dict):
            results[str(event.site)] = event.data.get("result")
        if event.kind == "workflow" and isinstance(event.data, dict) and event.data.get("op") == "publish":
            value = event.data.get("value")
            if isinstance(value, dict) and isinstance(value.get("model_hash"), str):
                recorded = value["model_hash"]
    if not results:
        raise ConfigError(f"job {job_id!r} has no accepted results in round {round_} in this log")
    if recorded is None:
        raise ConfigError(f"job {job_id!r} round {round_} published no model_hash: only tensor FedAvg rounds "
                          "(fedavg_torch) can be re-aggregated")
    if not all(refs_in(r) for r in results.values()):
        raise ConfigError(f"the results of job {job_id!r} round {round_} hold no tensor references")
    missing = [d for r in results.values() for d in refs_in(r) if chunks.missing([d])]
    if missing:
        raise ConfigError(f"the chunk store lacks {len(missing)} result manifest(s) of round {round_} "
                          f"(first: {missing[0]}); give the server's store with --chunks")
    updates = {site: replace_refs(value, lambda d: load(chunks, d, arrays=True)) for site, value in results.items()}
    mean, sites, _ = weighted_mean_tensors(updates)
    return Reaggregation(job_id, round_, sites, recorded, pack(mean).digest)
