"""``SwarmClientController``: one site's part in client-controlled (swarm) learning, resumable from its log.

Each site runs one controller per job while its ``swarm_run`` assignment executes.
Every round the site plays is a ``swarm_round`` machine in the site's own log
(``swarm:<job>:<round>:train`` as a trainer, ``swarm:<job>:<round>:aggr`` on the
round's aggregation site), and every step is recorded before its effect:

- **trainer**: the learn task arrives (aux ``<prefix>.learn``) → ``train`` (the
  learner runs on the global model, fetched from the server's chunk store: only the
  chunks this site lacks) → ``trained`` (the result is in the site's own store) →
  ``permit`` (the aggregator granted a submission slot, ``<prefix>.request_submit``)
  → ``upload`` (the result's chunks go to the server, a resumable ``stream_send``
  session) → ``submit`` (``<prefix>.submit`` names the manifest; the aggregator
  downloads it, verified) → ``round_closed`` when the next learn task comes;
- **aggregator**: ``gather`` → ``grant`` / ``accept`` (one per trainer; a repeat is
  answered ``duplicate`` and counted once) → ``min_reached`` / ``all_received`` /
  ``wait_elapsed`` / ``timeout`` → ``aggregated`` → ``scatter`` (the next model is
  uploaded once, the next aggregator is chosen and round+1's learn task sent to
  every site) or ``finalize`` → ``distributed`` (the swarm's end goes to every site).

After a SIGKILL the site's agent runs the assignment again and the controller picks
each open machine up where its log left it: a trainer that was training trains again
(the learner is seeded, so it computes the same bits), one that had trained submits
its stored result (its chunks already on the server are not sent again), an
aggregator goes on gathering with the results it accepted. Beyond the reference:

- a trainer that gets no answer from its aggregator for ``aggregator_timeout``
  (while the server answers) asks the next site of ``aggr_clients`` to take the
  round over and re-offers its stored result there; the old aggregator, if it comes
  back, finds out (``probe``) and records ``superseded``;
- a site that does not acknowledge round+1's learn task is recorded as absent and
  not waited for; when too few trainers remain to meet ``min_responses_required``
  the swarm ends ``failed`` with the reason, on every site;
- a server that is down stops only the relay: training goes on, and every message is
  retried (all are idempotent) until it answers.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.chunks import ChunkStore
from engine.chunks.base import Buffer
from engine.client.executor import SiteTask, load_callable
from engine.errors import ConfigError, EngineError, RemoteError, TransitionRejected, TransportError
from engine.faults import maybe_crash
from engine.machines.runtime import Runtime
from engine.streams import ReceiveSession, SendSession
from engine.swarm.config import STATUS_TOPIC, SwarmConfig
from engine.swarm.gatherer import Gatherer, Submission
from engine.tensors import Manifest, has_tensors, pack, ref, refs_in, unpack
from engine.tensors import store as store_packed

__all__ = ["KIND", "STATUS_TOPIC", "SwarmClientController", "SwarmFailed", "SwarmInterrupted"]

logger = logging.getLogger(__name__)

KIND = "swarm_round"
US = 1_000_000
_OPEN_AGGR = ("gathering", "min_received", "aggregating", "selecting_best")


class SwarmFailed(EngineError):
    """The swarm ended without a result (the reason says why; every site got it)."""


class SwarmInterrupted(EngineError):
    """The site is stopping: the assignment is left unfinished and resumed from the log at the next start."""


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class SwarmClientController:
    """Runs one site's rounds of one swarm job.

    Args:
        config: the checked configuration (the same on every site).
        site: this site's name.
        job_id: the job.
        runtime: the site's runtime (its own log).
        store: the site's chunk store.
        api: the site's routes on the server (chunk upload and download).
        send: ``send(target, topic, request, timeout) -> envelope``, an aux request through
            the server's relay (raises ``TransportError`` while the server is down).
        engine: handed to the learner as ``task.engine``.
    """

    def __init__(self, config: SwarmConfig, *, site: str, job_id: str, runtime: Runtime, store: ChunkStore,
                 api: Any, send: Callable[[str, str, Any, float], dict[str, Any]], engine: Any = None,
                 report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.site = site
        self.job_id = job_id
        self.runtime = runtime
        self.recorder = runtime.recorder
        self.store = store
        self.api = api
        self._send = send
        self.engine = engine
        self._report = report
        self.learner = load_callable(config.learner, "swarm learner")
        self._combine = None if config.aggregator == "weighted_mean" else load_callable(config.aggregator,
                                                                                         "swarm aggregator")
        self._compare = self._comparator(config.metric_comparator)
        self._lock = threading.RLock()
        #: notified whenever a message was handled: a submission slot may have freed
        self._slots = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._gatherers: dict[int, Gatherer] = {}
        self._silent_since: dict[int, float] = {}
        self._peer_silent_since: dict[tuple[int, str], float] = {}
        self._last_probe: dict[int, float] = {}
        self._probers: dict[int, threading.Thread] = {}
        self._stagers: dict[int, threading.Thread] = {}
        self._stop = threading.Event()
        self.end: dict[str, Any] | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    # -- names -------------------------------------------------------------------------------------

    def train_id(self, r: int) -> str:
        return f"swarm:{self.job_id}:{r}:train"

    def aggr_id(self, r: int) -> str:
        return f"swarm:{self.job_id}:{r}:aggr"

    @property
    def end_id(self) -> str:
        return f"swarm:{self.job_id}:end"

    def topic(self, name: str) -> str:
        return f"{self.config.task_name_prefix}.{name}"

    @staticmethod
    def _comparator(name: str) -> Callable[[float, float], int]:
        if name == "greater":
            return lambda a, b: (a > b) - (a < b)
        if name == "less":
            return lambda a, b: (a < b) - (a > b)
        fn = load_callable(name, "swarm metric_comparator")
        return lambda a, b: int(fn(a, b))

    # -- the log -------------------------------------------------------------------------------------

    def _state(self, machine_id: str) -> str | None:
        row = self.recorder.get_machine(machine_id)
        return None if row is None else row.state

    def _events(self, machine_id: str) -> list[tuple[str, dict[str, Any], int]]:
        return [(e.trigger or "", dict(e.data or {}), e.ts_us) for e in self.recorder.read(machine_id=machine_id)]

    def _data(self, machine_id: str) -> dict[str, Any]:
        """The machine's data: its creation data updated by every event's, in order."""
        merged: dict[str, Any] = {}
        for _, data, _ in self._events(machine_id):
            merged.update(data)
        return merged

    def _fire(self, machine_id: str, trigger: str, data: dict[str, Any] | None = None) -> bool:
        try:
            state = self.runtime.fire(machine_id, trigger, data or {})
        except TransitionRejected:
            return False
        self._status(machine_id, state.state)
        return True

    def _status(self, machine_id: str, state: str) -> None:
        if self._report is None:
            return
        _, _, r, role = machine_id.rsplit(":", 3) if machine_id.count(":") >= 3 else ("", "", "-1", "end")
        try:
            self._report({"round": int(r) if r.lstrip("-").isdigit() else None, "role": role, "state": state})
        except Exception as exc:  # noqa: BLE001 - a status report is advisory; the server reconciles later
            logger.debug("%s: status report not sent: %s", self.site, exc)

    def _open_rounds(self) -> list[tuple[int, str]]:
        prefix = f"swarm:{self.job_id}:"
        out = []
        for row in self.recorder.machines(kind=KIND, live_only=True, job_id=self.job_id):
            parts = row.machine_id[len(prefix):].split(":")
            if row.machine_id.startswith(prefix) and len(parts) == 2 and parts[0].isdigit():
                out.append((int(parts[0]), parts[1]))
        return sorted(out, key=lambda p: (p[0], p[1] == "train"))  # a round's aggregator before its trainer

    # -- the wire ---------------------------------------------------------------------------------------

    def _ask(self, target: str, name: str, request: dict[str, Any], timeout: float) -> tuple[str, Any]:
        """``("ok", reply)``; else ``("silent" | "starting" | "down" | "ended", None)``: the target did not
        answer, answered without its swarm handlers, the server is unreachable, the job is over."""
        if target == self.site:
            return "ok", self.handle(self.topic(name), request, self.site)
        try:
            self._prove_holding(request)
            envelope = self._send(target, self.topic(name), request, timeout)
        except (TransportError, RemoteError) as exc:
            if isinstance(exc, RemoteError) and exc.status == 403:
                return "ended", None  # the job is no longer running on the server
            return "down", None
        status = envelope.get("status")
        if status == "ok":
            return "ok", envelope.get("reply")
        if status == "timeout":
            return "silent", None  # the target's process did not answer (dead, or its poll was lost)
        return "starting", None  # it answered without a swarm handler (not running its assignment yet) or failed

    def _prove_holding(self, request: dict[str, Any]) -> None:
        """PUT the manifests ``request`` names (a few KB each) before it is sent.

        The server lets a request's targets read the payloads it names only if the sender
        may (it uploaded them or was given them), and a restarted server has forgotten
        uploads made before it died; a manifest PUT again (its bytes checked) proves it anew.
        """
        for digest in refs_in(request):
            if not self.store.missing([digest]):
                self.api.put_chunk(digest, self.store.get(digest))

    def _upload(self, machine_id: str, digest: str, crash_round: int | None = None, session: str = "send") -> None:
        """Put a manifest's chunks the server lacks (resumable session), then the manifest (proof of holding it)."""
        puts = [0]
        total = len(Manifest.from_bytes(self.store.get(digest)).chunk_digests())

        def put(d: str, data: Buffer) -> None:
            self.api.put_chunk(d, data)
            self.bytes_out += len(data)
            puts[0] += 1
            if crash_round is not None and puts[0] * 2 >= total:
                maybe_crash(crash_round, "upload")

        SendSession(self.runtime, self.store, self.api.missing_chunks, put, f"{session}:{machine_id}:{digest[:16]}",
                    in_flight=4).run(digest)
        manifest = self.store.get(digest)
        self.api.put_chunk(digest, manifest)
        self.bytes_out += len(manifest)

    def _download(self, session: str, digest: str) -> None:
        def fetch(d: str) -> bytes:
            data: bytes = self.api.get_chunk(d)
            self.bytes_in += len(data)
            return data

        ReceiveSession(self.runtime, self.store, fetch, f"recv:{session}:{digest[:16]}", in_flight=4,
                       entry_timeout=self.config.request_to_submit_result_msg_timeout * 6).run(digest)

    def _load(self, digest: str, *, arrays: bool = False) -> Any:
        return unpack(Manifest.from_bytes(self.store.get(digest)), arrays=arrays, read_into=self.store.read_into)

    def _store(self, value: Any) -> str:
        return store_packed(pack(value), self.store)

    # -- handlers (the aux thread) ------------------------------------------------------------------------

    def register(self, engine: Any) -> None:
        """Answer the swarm's topics on ``engine`` (a ``SiteEngine``)."""
        for name in ("learn", "request_submit", "submit", "take_over", "probe", "superseded", "absent", "end"):
            engine.register_aux_message_handler(self.topic(name), self.handle, concurrent=True)

    def handle(self, topic: str, request: Any, sender: str) -> Any:
        """Dispatch one swarm message (also called directly when a site addresses itself)."""
        name = topic.rsplit(".", 1)[-1]
        if not isinstance(request, dict):
            return {"status": "bad_request", "reason": "a swarm message is a mapping"}
        handler = getattr(self, f"_on_{name}", None)
        if handler is None:
            return {"status": "bad_request", "reason": f"unknown swarm message {name!r}"}
        try:
            reply: Any = handler(request, sender)
        finally:
            self._wake.set()
            with self._slots:
                self._slots.notify_all()
        return reply

    def _on_learn(self, task: dict[str, Any], sender: str) -> dict[str, Any]:
        r = int(task["round"])
        with self._lock:
            if self.end is not None or self._state(self.end_id) is not None:
                return {"status": "ended"}
            self._close_before(r)
            if self.site in task["trainers"] and self._state(self.train_id(r)) is None:
                self.runtime.create(KIND, machine_id=self.train_id(r), job_id=self.job_id, round=r, site=self.site,
                                    data={**task, "from": sender})
                self._status(self.train_id(r), "learn_task_received")
            if task["aggregator"] == self.site and self._state(self.aggr_id(r)) is None:
                self._start_gathering(r, task, "gather")
        return {"status": "ok"}

    def _start_gathering(self, r: int, task: dict[str, Any], how: str, previous: str | None = None) -> None:
        mid = self.aggr_id(r)
        self.runtime.create(KIND, machine_id=mid, job_id=self.job_id, round=r, site=self.site,
                            data={**task, "aggregator": self.site})
        data: dict[str, Any] = {"learn_task_timeout": self.config.learn_task_timeout}
        if previous is not None:
            data["previous"] = previous
        self._fire(mid, how, data)

    def _close_before(self, r: int) -> None:
        """Round ``r``'s learn task arrived: earlier rounds on this site are over."""
        for rr, role in self._open_rounds():
            if rr >= r:
                continue
            mid = self.train_id(rr) if role == "train" else self.aggr_id(rr)
            if role == "train":
                self._fire(mid, "round_closed", {"by_round": r})
            elif self._state(mid) in _OPEN_AGGR:
                self._fire(mid, "replaced", {"reason": f"round {r} began elsewhere"})
                self._gatherers.pop(rr, None)

    def _gatherer(self, r: int) -> Gatherer | None:
        g = self._gatherers.get(r)
        if g is None:
            mid = self.aggr_id(r)
            if self._state(mid) not in (*_OPEN_AGGR, "scattering", "distributing"):
                return None
            events = self._events(mid)
            trainers = list(events[0][1].get("trainers") or self.config.train_clients)
            g = self._gatherers[r] = Gatherer.from_events(self.config, r, trainers, events)
        return g

    def _open_gatherer(self, r: int) -> Gatherer | dict[str, Any]:
        """Round ``r``'s gatherer while it is gathering here, else the answer to give the trainer."""
        state = self._state(self.aggr_id(r))
        if state == "superseded":
            return {"status": "superseded", "by": self._data(self.aggr_id(r)).get("by")}
        if state is None:
            return {"status": "not_ready"}
        if state not in ("gathering", "min_received"):
            return {"status": "closed"}
        g = self._gatherer(r)
        assert g is not None
        return g

    def _on_request_submit(self, req: dict[str, Any], sender: str) -> dict[str, Any]:
        """Grant a submission slot; while all ``max_concurrent_submissions`` are taken, hold the request
        (up to half its message timeout, at most 2 s) and grant it the moment one frees, so a queued
        trainer does not lose a ``request_to_submit_result_interval`` per slot it waits for."""
        r, site = int(req["round"]), str(req["site"])
        hold_until = time.monotonic() + min(2.0, self.config.request_to_submit_result_msg_timeout / 2)
        with self._slots:
            while True:
                g = self._open_gatherer(r)
                if isinstance(g, dict):
                    return g
                now = self.runtime.clock.now_us()
                verdict = g.can_accept_submission(site, now)
                if verdict == "ok":
                    self._fire(self.aggr_id(r), "grant", {"site": site})
                    g.grants[site] = now
                    return {"status": "ok"}
                left = hold_until - time.monotonic()
                if verdict != "busy" or left <= 0 or self._stop.is_set():
                    return {"status": "ok" if verdict == "granted" else verdict}
                self._slots.wait(left)

    def _on_submit(self, req: dict[str, Any], sender: str) -> dict[str, Any]:
        r, site = int(req["round"]), str(req["site"])
        model = str((req.get("result") or {}).get("$tensors"))
        with self._lock:
            g = self._open_gatherer(r)
            if isinstance(g, dict):
                return g
            if site in g.accepted:
                return {"status": "duplicate"}
            if site not in g.grants and site != self.site:
                return {"status": "not_permitted"}
        if site != self.site:
            self._download(f"{self.aggr_id(r)}/{site}", model)  # verified chunks, durable before `accept`
        with self._lock:
            g = self._open_gatherer(r)
            if isinstance(g, dict):
                return g
            sub = Submission(site, model, float(req["n"]), _num(req.get("metric")))
            if not g.gather(sub):
                return {"status": "duplicate"}
            self._fire(self.aggr_id(r), "accept", {"site": site, "result": model, "n": sub.n, "metric": sub.metric})
            if len(g.accepted) == 1:
                maybe_crash(r, "gather")
            return {"status": "accepted"}

    def _on_take_over(self, req: dict[str, Any], sender: str) -> dict[str, Any]:
        r = int(req["round"])
        with self._lock:
            if self.end is not None or self._state(self.end_id) is not None:
                return {"status": "ended"}
            state = self._state(self.aggr_id(r))
            if state in ("gathering", "min_received"):
                return {"status": "ok"}
            if state is not None:
                return {"status": "closed", "state": state}
            if self.site not in self.config.aggr_clients:
                return {"status": "refused", "reason": f"{self.site} is not one of aggr_clients"}
            task = dict(req["learn"])
            self._start_gathering(r, task, "take_over", previous=str(req.get("previous")))
            logger.warning("%s: took over round %d's aggregation from %s", self.site, r, req.get("previous"))
        previous = req.get("previous")
        if isinstance(previous, str) and previous != self.site:
            with contextlib.suppress(EngineError):  # the old aggregator, if back, stops gathering (it may be dead)
                self._send(previous, self.topic("superseded"), {"round": r, "by": self.site}, 2.0)
        return {"status": "ok"}

    def _on_superseded(self, req: dict[str, Any], sender: str) -> dict[str, Any]:
        r, by = int(req["round"]), str(req["by"])
        with self._lock:
            if self._state(self.aggr_id(r)) in _OPEN_AGGR:
                self._fire(self.aggr_id(r), "replaced", {"by": by})
                self._gatherers.pop(r, None)
            if self._state(self.train_id(r)) in ("requesting_permission", "permitted", "uploading", "submitted") \
                    and self._data(self.train_id(r)).get("aggregator") == self.site:
                self._fire(self.train_id(r), "aggregator_replaced", {"aggregator": by, "previous": self.site})
        return {"status": "ok"}

    def _on_probe(self, req: dict[str, Any], sender: str) -> dict[str, Any]:
        r = int(req.get("round", -1))
        end = self._data(self.end_id) if self._state(self.end_id) is not None else None
        return {"aggregating": self._state(self.aggr_id(r)) in ("gathering", "min_received"), "end": end}

    def _on_absent(self, req: dict[str, Any], sender: str) -> dict[str, Any]:
        r = int(req["round"])
        with self._lock:
            g = self._gatherer(r)
            if g is not None and self._state(self.aggr_id(r)) in ("gathering", "min_received"):
                new = sorted(set(req["sites"]) - g.absent)
                if new:
                    self._fire(self.aggr_id(r), "note_absent", {"sites": new})
                    g.absent.update(new)
        return {"status": "ok"}

    def _on_end(self, req: dict[str, Any], sender: str) -> dict[str, Any]:
        with self._lock:
            if self._state(self.end_id) is None:
                self.runtime.create(KIND, machine_id=self.end_id, job_id=self.job_id, site=self.site,
                                    data={**req, "from": sender})
                self._fire(self.end_id, "final_received" if req.get("status") == "done" else "fail",
                           {"status": req.get("status")})
                for rr, role in self._open_rounds():
                    mid = self.train_id(rr) if role == "train" else self.aggr_id(rr)
                    if role == "train":
                        self._fire(mid, "round_closed", {"end": req.get("status")})
                    elif mid != self.aggr_id(int(req.get("round", -1))):
                        self._fire(mid, "abort", {"reason": "the swarm ended"})
        return {"status": "ok"}

    # -- the worker (the executor's thread) ------------------------------------------------------------------

    def run(self, initial: dict[str, Any], should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Play every round this site has a part in until the swarm ends; return how it ended.

        ``initial`` is round 0's learn task (from the ``swarm_run`` assignment).

        The objects alive now (the imported ML stack: ~300,000 with torch) are moved out
        of the garbage collector's sight (``gc.freeze``): ``memory_gc_rounds``' collection
        then walks only what the rounds made, microseconds instead of the 0.15 s a full
        collection took here between a trainer's result and its permission request.
        """
        if self.config.memory_gc_rounds:
            gc.collect()
            gc.freeze()
        if self._state(self.end_id) is None and self._state(self.train_id(0)) is None \
                and self._state(self.aggr_id(0)) is None and not self._open_rounds() \
                and not self._any_round_started():
            self._on_learn(initial, "server")
        self._check_superseded()
        idle_since = time.monotonic()
        while True:
            if self._state(self.end_id) is not None:
                return self._finish()
            if should_stop() or self._stop.is_set():
                raise SwarmInterrupted(f"{self.site}: stopped before the swarm ended")
            progressed = False
            for r, role in self._open_rounds():
                progressed |= self._step_aggregator(r) if role == "aggr" else self._step_trainer(r)
                if self._state(self.end_id) is not None:
                    break
            if progressed:
                idle_since = time.monotonic()
                continue
            if time.monotonic() - idle_since > max(5.0, self.config.learn_task_abort_timeout):
                self._ask_peers_for_end()
                idle_since = time.monotonic()
            self._wake.wait(self.config.learn_task_check_interval)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _any_round_started(self) -> bool:
        prefix = f"swarm:{self.job_id}:"
        return any(row.machine_id.startswith(prefix) for row in self.recorder.machines(kind=KIND, job_id=self.job_id))

    def _check_superseded(self) -> None:
        """At a (re)start: an open aggregation of ours that another site took over while we were away."""
        for r, role in self._open_rounds():
            if role != "aggr" or self._state(self.aggr_id(r)) not in ("gathering", "min_received"):
                continue
            for other in self.config.aggr_clients:
                if other == self.site:
                    continue
                status, reply = self._ask(other, "probe", {"round": r}, 2.0)
                if status == "ok" and isinstance(reply, dict) and reply.get("aggregating"):
                    self._on_superseded({"round": r, "by": other}, other)
                    break

    def _ask_peers_for_end(self) -> None:
        """Nothing to do for a while: a site that was away may have missed the swarm's end."""
        for other in self.config.sites:
            if other == self.site:
                continue
            status, reply = self._ask(other, "probe", {"round": -1}, 2.0)
            if status == "ok" and isinstance(reply, dict) and isinstance(reply.get("end"), dict):
                end = {k: v for k, v in reply["end"].items() if k not in ("from", "status")}
                self._on_end({**end, "status": reply["end"].get("status", "done")}, other)
                return

    def _finish(self) -> dict[str, Any]:
        end = self._data(self.end_id)
        if end.get("status") != "done":
            raise SwarmFailed(str(end.get("reason") or "the swarm failed"))
        out: dict[str, Any] = {"status": "done", "rounds": end.get("rounds"), "model_hash": end.get("last"),
                               "best_hash": end.get("best"), "best_metric": end.get("best_metric"),
                               "best_round": end.get("best_round")}
        if self.site in self.config.result_clients:
            for key, digest in (("model", end.get("last")), ("best_model", end.get("best"))):
                if isinstance(digest, str):
                    if not self._held(digest):
                        self._download(f"{self.end_id}/{key}", digest)
                    out[key] = ref(digest)
        self.end = out
        return out

    # -- trainer steps -----------------------------------------------------------------------------------------

    def _step_trainer(self, r: int) -> bool:
        mid = self.train_id(r)
        state = self._state(mid)
        if state in ("learn_task_received", "training"):
            self._train(r, mid, state)
            return True
        if state == "requesting_permission":
            self._stage(r, mid)
            return self._request_permission(r, mid)
        if state == "permitted":
            self._fire(mid, "upload", {"learn_task_ack_timeout": None})
            return True
        if state == "uploading":
            return self._upload_and_submit(r, mid)
        return False

    def _train(self, r: int, mid: str, state: str) -> None:
        task = self._events(mid)[0][1]
        if state == "learn_task_received":
            self._fire(mid, "train", {})
        maybe_crash(r, "train")
        digest = str(task["model"]["$tensors"])
        if not self._held(digest):
            self._download(mid, digest)
        model = self._load(digest)
        site_task = SiteTask(job_id=self.job_id, task_id=mid, client_task_id=mid, name=self.config.learn_task_name,
                             data={**self.config.learner_args, "round": r, "model": model,
                                   "sites": list(self.config.train_clients)},
                             props={"swarm": True}, site=self.site, job_sites=tuple(self.config.sites),
                             engine=self.engine)
        try:
            result = self.learner(site_task)
            if not isinstance(result, dict) or not has_tensors(result.get("model")):
                raise ConfigError(f"the learner {self.config.learner} must return {{'model': state_dict, 'n': ...}}, "
                                  f"got {type(result).__name__}")
            n = _num(result.get("n"))
            if n is None or n <= 0:
                raise ConfigError(f"the learner {self.config.learner} returned n={result.get('n')!r}; "
                                  "the example count must be a positive number")
        except Exception as exc:  # noqa: BLE001 - the round fails, recorded, and every site is told
            logger.exception("%s: training round %d failed", self.site, r)
            self._fire(mid, "fail", {"error": f"{type(exc).__name__}: {exc}"})
            self._broadcast_end({"status": "failed", "round": r,
                                 "reason": f"{self.site} failed to train round {r}: {type(exc).__name__}: {exc}"})
            return
        result_digest = self._store(result["model"])
        self.store.sync()  # the result is durable before it is recorded
        self._fire(mid, "trained", {"result": result_digest, "n": n, "metric": _num(result.get("metric")),
                                    "request_to_submit_result_max_wait": self.config.request_to_submit_result_max_wait})
        if self.config.memory_gc_rounds and r % self.config.memory_gc_rounds == 0:
            gc.collect()  # cheap: what was alive at the start is frozen (see ``run``)

    def _held(self, digest: str) -> bool:
        """True when the local store holds the manifest and every chunk it names."""
        if self.store.missing([digest]):
            return False
        return not self.store.missing(Manifest.from_bytes(self.store.get(digest)).chunk_digests())

    def _aggregator_of(self, mid: str) -> str:
        return str(self._data(mid)["aggregator"])

    def _overdue(self, mid: str) -> bool:
        deadline = self.runtime.get(mid).deadline_us
        return deadline is not None and self.runtime.clock.now_us() >= deadline

    def _request_permission(self, r: int, mid: str) -> bool:
        if self._overdue(mid):
            self._fire(mid, "timeout", {"reason": "no permission within request_to_submit_result_max_wait"})
            return True
        aggregator = self._aggregator_of(mid)
        status, reply = self._ask(aggregator, "request_submit", {"round": r, "site": self.site},
                                  self.config.request_to_submit_result_msg_timeout)
        if status == "ok" and isinstance(reply, dict):
            self._silent_since.pop(r, None)
            answer = reply.get("status")
            if answer == "ok":
                self._fire(mid, "permit", {"aggregator": aggregator})
                return True
            if answer == "duplicate":  # accepted before this site crashed: it is submitted
                self._fire(mid, "permit", {"aggregator": aggregator})
                return True
            if answer == "superseded" and isinstance(reply.get("by"), str):
                self._fire(mid, "aggregator_replaced", {"aggregator": reply["by"], "previous": aggregator})
                return True
            if answer in ("closed", "unknown_trainer"):
                self._fire(mid, "refuse", {"reason": answer})
                return True
            time.sleep(self.config.request_to_submit_result_interval)  # busy / not_ready: ask again
            return False
        if status == "ended":
            self._ask_peers_for_end()
            return False
        if status == "silent":
            return self._maybe_replace(r, mid, aggregator)
        time.sleep(self.config.request_to_submit_result_interval)  # the server is down: wait for it
        return False

    def _maybe_replace(self, r: int, mid: str, aggregator: str) -> bool:
        """The aggregator does not answer (the server does): after ``aggregator_timeout``, replace it."""
        now = time.monotonic()
        since = self._silent_since.setdefault(r, now)
        if now - since < self.config.aggregator_timeout:
            time.sleep(self.config.request_to_submit_result_interval)
            return False
        order = self.config.aggr_clients
        start = order.index(aggregator) if aggregator in order else -1
        candidates = [order[(start + i) % len(order)] for i in range(1, len(order) + 1)]
        task = {k: v for k, v in self._events(mid)[0][1].items() if k != "from"}
        for candidate in candidates:
            if candidate == aggregator:
                continue
            status, reply = self._ask(candidate, "take_over", {"round": r, "learn": task, "previous": aggregator},
                                      self.config.request_to_submit_result_msg_timeout)
            if status == "ok" and isinstance(reply, dict) and reply.get("status") == "ok":
                logger.warning("%s: round %d's aggregator %s is silent; %s took over", self.site, r, aggregator,
                               candidate)
                self._silent_since.pop(r, None)
                self._fire(mid, "aggregator_replaced", {"aggregator": candidate, "previous": aggregator})
                return True
        self._silent_since[r] = now - self.config.aggregator_timeout / 2  # try the candidates again soon
        return False

    def _stage(self, r: int, mid: str) -> None:
        """Start putting the round's result into the server's chunk store while permission is asked for.

        The permission (``max_concurrent_submissions``) bounds what the aggregator takes in
        at once; here a result travels to the server's store, not to the aggregator, so
        staging it costs the aggregator nothing, and it overlaps with the other trainers'
        training instead of queueing behind their submissions. It is its own resumable
        ``stream_send`` session (``stage:...``); the ``uploading`` step that follows the
        permission waits for it and finds nothing left to send but the manifest.
        """
        if r in self._stagers:
            return
        data = self._data(mid)
        if str(data.get("aggregator")) == self.site or not isinstance(data.get("result"), str):
            return

        def stage() -> None:
            try:
                self._upload(mid, str(data["result"]), crash_round=r, session="stage")
            except (TransportError, RemoteError) as exc:  # the uploading step sends what is still missing
                logger.info("%s: staging round %d's result paused (%s)", self.site, r, exc)

        thread = self._stagers[r] = threading.Thread(target=stage, daemon=True, name=f"swarm-stage-{r}")
        thread.start()

    def _upload_and_submit(self, r: int, mid: str) -> bool:
        data = self._data(mid)
        aggregator, digest = str(data["aggregator"]), str(data["result"])
        if aggregator != self.site:
            stager = self._stagers.get(r)
            if stager is not None:
                stager.join()  # never two sessions sending the same chunks
            try:
                self._upload(mid, digest, crash_round=r)
            except (TransportError, RemoteError) as exc:
                logger.info("%s: upload of round %d paused (%s); retrying", self.site, r, exc)
                time.sleep(self.config.request_to_submit_result_interval)
                return False
        status, reply = self._ask(aggregator, "submit", {"round": r, "site": self.site, "result": ref(digest),
                                                         "n": data["n"], "metric": data.get("metric")},
                                  self.config.request_to_submit_result_msg_timeout)
        if status == "ok" and isinstance(reply, dict):
            answer = reply.get("status")
            if answer in ("accepted", "duplicate"):
                self._fire(mid, "submit", {"aggregator": aggregator, "answer": answer})
                return True
            if answer == "superseded" and isinstance(reply.get("by"), str):
                self._fire(mid, "aggregator_replaced", {"aggregator": reply["by"], "previous": aggregator})
                return True
            if answer == "not_permitted":
                self._fire(mid, "permission_lost", {"aggregator": aggregator})
                return True
            if answer == "closed":
                self._fire(mid, "round_closed", {"reason": "the aggregator had closed the round"})
                return True
        elif status == "silent":
            return self._maybe_replace(r, mid, aggregator)
        time.sleep(self.config.request_to_submit_result_interval)
        return False

    # -- aggregator steps -----------------------------------------------------------------------------------------

    def _step_aggregator(self, r: int) -> bool:
        mid = self.aggr_id(r)
        state = self._state(mid)
        if state in ("gathering", "min_received"):
            return self._check_gathering(r, mid, state)
        if state == "aggregating":
            self._aggregate(r, mid)
            return True
        if state == "selecting_best":
            self._select_best(r, mid)
            return True
        if state == "scattering":
            self._scatter(r, mid)
            return True
        if state == "distributing":
            self._distribute(r, mid)
            return True
        return False

    def _probe_trainers(self, r: int, mid: str) -> None:
        """Trainers yet to submit that answer no probe for ``aggregator_timeout`` are recorded absent.

        A trainer that is training still answers (its handlers run on their own
        threads); one that restarts answers within seconds. One that stays silent has
        left, and the gatherer stops waiting for it (or fails the round at once when
        ``min_responses_required`` can no longer be met).
        """
        now = time.monotonic()
        if now - self._last_probe.get(r, 0.0) < max(0.5, self.config.aggregator_timeout / 6):
            return
        self._last_probe[r] = now
        g = self._gatherer(r)
        if g is None:
            return
        waiting = [s for s in g.expected() if s not in g.accepted and s != self.site]
        if not waiting:
            return
        with ThreadPoolExecutor(max_workers=min(8, len(waiting))) as pool:
            answers = dict(zip(waiting, pool.map(lambda s: self._ask(s, "probe", {"round": r}, 2.0)[0], waiting),
                               strict=True))
        gone = []
        for site, status in answers.items():
            if status != "silent":  # it answered, or the server is down (not the trainer's silence)
                self._peer_silent_since.pop((r, site), None)
                continue
            since = self._peer_silent_since.setdefault((r, site), now)
            if now - since >= self.config.aggregator_timeout:
                gone.append(site)
        if gone:
            self._on_absent({"round": r, "sites": gone}, self.site)

    def _check_gathering(self, r: int, mid: str, state: str) -> bool:
        prober = self._probers.get(r)
        if prober is None or not prober.is_alive():  # probes wait on silent sites: never on this thread
            prober = self._probers[r] = threading.Thread(target=self._probe_trainers, args=(r, mid), daemon=True,
                                                         name=f"swarm-probe-{r}")
            prober.start()
        with self._lock:
            g = self._gatherer(r)
            if g is None or self._state(mid) != state:
                return True
            reason = g.unreachable_reason()
            if reason is not None:
                self._fire(mid, "fail", {"reason": reason})
                self._broadcast_end({"status": "failed", "round": r, "reason": reason})
                return True
            trigger = g.is_done(state, self.runtime.clock.now_us(), self.runtime.get(mid).deadline_us)
            if trigger is None:
                return False
            if trigger in ("timeout", "wait_elapsed") and not g.min_reached():
                reason = (f"round {r}: learn_task_timeout passed with {len(g.accepted)} result(s); "
                          f"min_responses_required={self.config.min_responses_required}")
                self._fire(mid, "fail", {"reason": reason})
                self._broadcast_end({"status": "failed", "round": r, "reason": reason})
                return True
            data: dict[str, Any] = {"accepted": sorted(g.accepted)}
            if trigger == "min_reached":
                data = {"wait_time_after_min_resps_received": self.config.wait_time_after_min_resps_received,
                        "accepted": sorted(g.accepted)}
            self._fire(mid, trigger, data)
            return True

    def _aggregate(self, r: int, mid: str) -> None:
        g = self._gatherer(r)
        assert g is not None
        mean, sites, total, metric = g.aggregate(lambda d: self._load(d, arrays=False), self._combine)
        digest = self._store(mean)
        self.store.sync()
        self._fire(mid, "aggregated", {"aggregate": digest, "sites": sites, "n": total, "metric": metric})

    def _select_best(self, r: int, mid: str) -> None:
        data = self._data(mid)
        task = self._events(mid)[0][1]
        best = data.get("best") if isinstance(data.get("best"), dict) else None
        metric = _num(data.get("metric"))
        global_model = str(task["model"]["$tensors"])
        # the metric is the trainers' validation of this round's global model: it is the candidate
        if metric is not None and (best is None or best.get("metric") is None
                                   or self._compare(metric, float(best["metric"])) > 0):
            best = {"metric": metric, "round": r, "model": global_model}
        best = best or {"metric": None, "round": r, "model": global_model}
        trigger = "finalize" if r + 1 >= self.config.num_rounds else "scatter"
        self._fire(mid, trigger, {"best": best})

    def _next_aggregators(self, r: int, alive: list[str]) -> list[str]:
        """Round ``r``'s aggregator candidates, the first chosen by the seeded draw (the same on every site)."""
        pool = [s for s in self.config.aggr_clients if s in alive] or list(self.config.aggr_clients)
        first = random.Random(f"{self.config.seed or self.job_id}/{r}").choice(pool)
        return [first, *[s for s in self.config.aggr_clients if s != first]]

    def _deliver(self, targets: list[str], name: str, message: dict[str, Any], budget: float) -> set[str]:
        """Send ``message`` to the targets in parallel, each until it acknowledges or ``budget`` s pass;
        return who did (a silent site costs the budget once, not once per site)."""
        if not targets:
            return set()

        def one(target: str) -> bool:
            end = time.monotonic() + budget
            while True:
                # short tries: a message lost with a restarting site's old connection is sent again
                status, _ = self._ask(target, name, message, max(1.0, min(5.0, budget / 3)))
                if status == "ok":
                    return True
                if status == "down":
                    end += self.config.request_to_submit_result_interval  # the server's outage is not theirs
                if time.monotonic() >= end or self._stop.is_set():
                    return False
                time.sleep(self.config.request_to_submit_result_interval)

        with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
            return {t for t, ok in zip(targets, pool.map(one, targets), strict=True) if ok}

    def _scatter(self, r: int, mid: str) -> None:
        data = self._data(mid)
        digest = self._aggregate_digest(mid)
        self._upload_retrying(mid, digest)
        maybe_crash(r, "scatter")
        g = self._gatherer(r)
        alive = sorted(set(g.accepted if g else ()) | {self.site})
        trainers = list(self.config.train_clients)
        learn = {"round": r + 1, "model": ref(digest), "best": data.get("best"), "trainers": trainers}
        aggregator = None
        for candidate in self._next_aggregators(r + 1, alive):
            if self._deliver([candidate], "learn", {**learn, "aggregator": candidate},
                             self.config.learn_task_ack_timeout):
                aggregator = candidate
                break
        if aggregator is None:
            reason = f"round {r + 1}: no site of aggr_clients {self.config.aggr_clients} acknowledged its learn task"
            self._fire(mid, "fail", {"reason": reason})
            self._broadcast_end({"status": "failed", "round": r, "reason": reason})
            return
        others = [s for s in self.config.sites if s != aggregator]
        acked = self._deliver(others, "learn", {**learn, "aggregator": aggregator},
                              self.config.learn_task_ack_timeout) | {aggregator}
        absent = sorted(set(trainers) - acked)
        if absent:
            self._deliver([aggregator], "absent", {"round": r + 1, "sites": absent}, self.config.learn_task_ack_timeout)
        self._fire(mid, "scattered", {"aggregator": aggregator, "acked": sorted(acked), "absent": absent})

    def _aggregate_digest(self, mid: str) -> str:
        for trigger, data, _ in self._events(mid):
            if trigger == "aggregated":
                return str(data["aggregate"])
        raise ConfigError(f"{mid} has no aggregate")

    def _upload_retrying(self, mid: str, digest: str) -> None:
        while True:
            try:
                self._upload(mid, digest)
                return
            except (TransportError, RemoteError) as exc:
                if self._stop.is_set():
                    raise
                logger.info("%s: upload of %s paused (%s); retrying", self.site, mid, exc)
                time.sleep(self.config.request_to_submit_result_interval)

    def _distribute(self, r: int, mid: str) -> None:
        data = self._data(mid)
        last = self._aggregate_digest(mid)
        best = data.get("best") or {}
        best_model = best.get("model") or last
        self._upload_retrying(mid, last)
        if best_model != last:
            self._upload_retrying(mid, str(best_model))
        end = {"status": "done", "round": r, "rounds": self.config.num_rounds, "last": last, "best": best_model,
               "best_metric": best.get("metric"), "best_round": best.get("round"),
               "models": [ref(last), ref(str(best_model))]}
        self._deliver([s for s in self.config.sites if s != self.site], "end", end,
                      self.config.final_result_ack_timeout)
        self._fire(mid, "distributed", {"last": last, "best": best_model})
        self._on_end(end, self.site)

    def _broadcast_end(self, end: dict[str, Any]) -> None:
        """Every site learns that the swarm ended (failed): best effort, then recorded here."""
        self._deliver([s for s in self.config.sites if s != self.site], "end", end,
                      self.config.final_result_ack_timeout)
        self._on_end(end, self.site)
