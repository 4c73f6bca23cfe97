"""``fedlog simulate``: a server and N client sites as real processes on loopback, with kills.

The simulation provisions a federation in its work folder, starts ``fedlog server``
on the embedded default (or ``--db URL``) and the sites, each with its own local log,
chunk store and connection, submits the job and watches it to the end. A site that a
kill may touch runs in a ``fedlog client`` process of its own; the others share one
(``fedlog client`` with several ``--identity``, a thread each), so the ML stack is
imported once rather than once per site (``process_per_site`` turns that off). Kills
are real SIGKILLs:

- ``kill_server_at``: ``ROUND.PHASE`` crash points (``engine.faults``): the server kills
  itself exactly there (a result recorded but not yet answered, an aggregation not yet
  recorded, ...); one point per server incarnation, in order;
- ``kill_server_after``: SIGKILL the server that many seconds after the job was submitted;
- ``kill_server_after_events``: the server SIGKILLs itself once that many of its events
  are durable (counted from its start): the same instant of the job however fast it runs;
- ``kill_server_random`` / ``kill_client_random``: each seed picks several kills (and,
  for clients, which site) from its own random stream, so a run is repeatable. Each
  kill is a random position in the victim's log: the process SIGKILLs itself once that
  many of its events are durable (``FEDLOG_CRASH_AFTER_APPENDS``), before it acts on
  them — a random instant of the job's life, however fast the job runs.

A killed server is started again at once on the same port and log; a killed client
too. The summary reports the job's status, rounds, wall time, traffic, each site's
counts, every kill, and ``result_hash`` — equal across runs that computed the same
result, which is how a crashed run is compared with an uncrashed one.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from engine.client.api import AdminApi
from engine.client.transport import HttpTransport
from engine.errors import ConfigError, EngineError, RemoteError, TransportError
from engine.faults import APPENDS_ENV, CRASH_ENV, PHASES, crash_points
from engine.log.peek import count_triggers
from engine.provision import SERVER_DIR, load_identity, provision
from engine.server.serve import ServerProcess

__all__ = ["SimOptions", "Simulation", "simulate"]

_TERMINAL = ("finished", "failed", "aborted")
#: kills each random seed picks
KILLS_PER_SEED = 3


@dataclass
class SimOptions:
    """What to simulate and how to disturb it."""

    spec: dict[str, Any]
    clients: int = 2
    workdir: Path | None = None
    #: the server's log: None = SQLite in the work folder; else a URL
    db: str | None = None
    kill_server_at: list[str] = field(default_factory=list)
    kill_server_after: list[float] = field(default_factory=list)
    kill_server_after_events: list[int] = field(default_factory=list)
    kill_server_random: list[int] = field(default_factory=list)
    kill_client_random: list[int] = field(default_factory=list)
    #: ``SITE:ROUND.PHASE`` (``*``: every site): the site SIGKILLs itself there and is started again
    kill_site_at: list[str] = field(default_factory=list)
    #: the same, but the site is not started again (it left for good)
    leave_site_at: list[str] = field(default_factory=list)
    #: a locally defined executor shipped to the client processes with cloudpickle
    executor: Callable[..., Any] | None = None
    timeout: float = 600.0
    keep: bool = False
    #: one process per site even for the sites no kill touches (by default those share one
    #: process, a thread each, so the ML stack is imported once)
    process_per_site: bool = False
    progress: IO[str] | None = None


@dataclass
class _Kill:
    at_s: float
    target: str
    how: str
    done: bool = False


def _point_key(point: str) -> tuple[int, int]:
    round_text, phase = point.split(".")
    return int(round_text), PHASES.index(phase)


class Simulation:
    """One simulated run; ``run()`` returns the summary dict."""

    def __init__(self, options: SimOptions) -> None:
        if options.clients < 1:
            raise ConfigError(f"--clients must be >= 1, got {options.clients}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in options.kill_server_after_events):
            raise ConfigError(f"--kill-server-after-events takes counts >= 1, got {options.kill_server_after_events}")
        self.o = options
        # wait for every simulated site unless the job says otherwise
        options.spec = {**options.spec, "min_sites": options.spec.get("min_sites", options.clients)}
        try:
            self.points = sorted(crash_points(",".join(options.kill_server_at)), key=_point_key)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.sites = [f"site-{i}" for i in range(1, options.clients + 1)]
        #: per site: crash points still to arm, in order, and whether the site then leaves for good
        self.site_points: dict[str, list[tuple[str, bool]]] = {s: [] for s in self.sites}
        for entries, leave in ((options.kill_site_at, False), (options.leave_site_at, True)):
            for entry in entries:
                site, sep, point = entry.partition(":")
                if not sep or (site != "*" and site not in self.sites):
                    raise ConfigError(f"site crash point {entry!r} must look like SITE:ROUND.PHASE with SITE one of "
                                      f"{', '.join(self.sites)} or *")
                try:
                    (checked,) = crash_points(point)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
                for target in self.sites if site == "*" else [site]:
                    self.site_points[target].append((checked, leave))
        #: sites that left for good (not restarted)
        self.left: set[str] = set()
        self.own_workdir = options.workdir is None
        self.workdir = Path(options.workdir or tempfile.mkdtemp(prefix="fedlog-sim-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.server: ServerProcess | None = None
        # a free port chosen now, so the sites can start (and import their ML stack) while the
        # server starts; they retry with backoff until it listens
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.client_restarts = dict.fromkeys(self.sites, 0)
        self.client_stats: dict[str, dict[str, Any]] = {}
        self.kills: list[_Kill] = []
        self.server_starts = 0
        self.traffic: dict[int, dict[str, int]] = {}
        self.recovery: list[dict[str, Any]] = []
        self._env = {**os.environ}
        self._env.pop(CRASH_ENV, None)
        self._env.pop(APPENDS_ENV, None)
        #: random kills still to arm: (events, description), for the server and per site
        self.server_appends: list[tuple[int, str]] = []
        self.client_appends: dict[str, list[tuple[int, str]]] = {s: [] for s in self.sites}
        #: what the running incarnation was armed with (reported when it dies)
        self.server_armed: str | None = None
        self.client_armed: dict[str, str | None] = dict.fromkeys(self.sites)

    # -- processes --------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.o.progress is not None:
            print(f"[{time.monotonic() - self.t0:6.2f}s] {text}", file=self.o.progress, flush=True)

    def _start_server(self, wait: bool = True) -> None:
        fed = self.workdir / "fed"
        db = self.o.db or str(self.workdir / "server.db")
        args = ["server", "--credentials", str(fed / SERVER_DIR), "--db", db, "--chunks",
                str(self.workdir / "server.chunks"), "--host", "127.0.0.1",
                "--port", str(self.port), "--no-tls", "--heartbeat-timeout", "30", "--dead-grace", "30"]
        job_args = self.o.spec.get("args")
        model = job_args.get("model") if isinstance(job_args, dict) else None
        if isinstance(model, str) and ":" in model and self.server_starts == 0:
            args += ["--preload", model.split(":", 1)[0]]  # the initial model's child imports torch meanwhile
        env = dict(self._env)
        self.server_armed = None
        if self.points:
            env[CRASH_ENV] = self.points[0]
            self.server_armed = f"crash point {self.points[0]}"
        elif self.server_appends:
            events, how = self.server_appends.pop(0)
            env[APPENDS_ENV] = str(events)
            self.server_armed = how
        self.server = ServerProcess(args, env=env, module="engine.cli").launch()
        self.server_starts += 1
        if wait:
            self._server_ready()

    def _server_ready(self) -> None:
        assert self.server is not None
        self.server.wait_ready(timeout=60)
        self.port, self.url = self.server.port, self.server.url

    def _start_clients(self) -> None:
        """Start every site: the ones a kill may touch in a process each (a SIGKILL takes the whole
        process), the others together in one process (one import of the ML stack, not one per site)."""
        disturbed = [s for s in self.sites if self.site_points[s] or self.client_appends[s]]
        together = [s for s in self.sites if s not in disturbed]
        if self.o.process_per_site or len(together) < 2:
            disturbed, together = self.sites, []
        for site in disturbed:
            self._start_client(site)
        if together:
            self._start_client(*together)

    def _start_client(self, *sites: str) -> None:
        """One client process serving ``sites`` (restarted sites always get a process of their own)."""
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "engine.cli", "client", "--server", self.url, "--poll-wait", "5",
                "--backoff-cap", "0.5"]
        for site in sites:
            argv += ["--identity", str(self.workdir / "fed" / site), "--log", str(self.workdir / f"{site}.db")]
        if self.o.executor is not None:
            argv += ["--executor-pickle", str(self.workdir / "executor.pkl")]
        else:
            # import the ML stack (and warm it up) while the server starts: the executor's
            # module, and the learner's when the executor runs one (the swarm's)
            args = self.o.spec.get("args")
            learner = args.get("learner") if isinstance(args, dict) else None
            for target in (self.o.spec.get("executor"), learner):
                if isinstance(target, str) and ":" in target:
                    argv += ["--preload", target.split(":", 1)[0]]
        env = self._env
        site = sites[0]  # sites sharing a process have no kills to arm (see _start_clients)
        self.client_armed[site] = None
        if self.site_points[site]:
            point, leave = self.site_points[site][0]
            env = {**self._env, CRASH_ENV: point}
            self.client_armed[site] = f"crash point {point}" + (", then leaves" if leave else "")
        elif self.client_appends[site]:
            events, how = self.client_appends[site].pop(0)
            env = {**self._env, APPENDS_ENV: str(events)}
            self.client_armed[site] = how
        name = site if len(sites) == 1 else f"sites-{sites[0]}-{sites[-1]}"
        out = open(logs / f"{name}.out", "ab")  # noqa: SIM115 - lives as long as the child
        err = open(logs / f"{name}.err", "ab")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        for each in sites:
            self.clients[each] = proc
        out.close()
        err.close()

    def _kill_server(self, how: str) -> None:
        assert self.server is not None
        self.server.kill()
        self._say(f"server SIGKILLed ({how}); restarting")
        self._start_server()

    def _kill_client(self, site: str) -> None:
        proc = self.clients[site]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.client_restarts[site] += 1
        self._say(f"{site} SIGKILLed; restarting")
        self._start_client(site)

    # -- plan -------------------------------------------------------------------------------

    def _plan(self) -> None:
        for s in self.o.kill_server_after:
            self.kills.append(_Kill(float(s), "server", f"after {s:g} s"))
        for n in self.o.kill_server_after_events:
            self.server_appends.append((n, f"after {n} appended events"))
        for seed in self.o.kill_server_random:
            rng = random.Random(f"server:{seed}")
            for _ in range(KILLS_PER_SEED):
                events = rng.randint(2, 25)
                self.server_appends.append((events, f"random (seed {seed}) after {events} appended events"))
        for seed in self.o.kill_client_random:
            rng = random.Random(f"client:{seed}")
            for _ in range(KILLS_PER_SEED):
                site = self.sites[rng.randrange(len(self.sites))]
                events = rng.randint(1, 5)
                self.client_appends[site].append((events, f"random (seed {seed}) after {events} appended events"))
        self.kills.sort(key=lambda k: k.at_s)

    # -- run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the job to its end (or the timeout) and return the summary."""
        self.t0 = time.monotonic()
        provision(self.workdir / "fed", self.sites)
        if self.o.executor is not None:
            import cloudpickle

            (self.workdir / "executor.pkl").write_bytes(cloudpickle.dumps(self.o.executor))
        self._plan()
        try:
            # the server first (its child starts building the initial model at once), the
            # sites while it starts (they retry until it listens on the port chosen above)
            self._start_server(wait=False)
            self._start_clients()
            self._server_ready()
            self._say(f"server listening at {self.url}; {len(self.sites)} client(s) started")
            admin = AdminApi(HttpTransport(self.url, load_identity(self.workdir / "fed" / "admin").token,
                                           timeout=30))
            job = self._retry(lambda: admin.submit_job(self.o.spec))
            self._say(f"submitted {job['job_id']} ({job['name']})")
            started = time.monotonic()
            final = self._watch(admin, job["job_id"], started)
            wall = time.monotonic() - started
            result = self._retry(lambda: admin.job_result(job["job_id"]))
            sites = {s["site"]: s["state"] for s in self._retry(admin.sites)}
            self._note_traffic(admin)
            admin.transport.close()
        finally:
            self._stop_all()
        return self._summary(final, wall, result, sites)

    def _retry(self, fn: Callable[[], Any], attempts: int = 600) -> Any:
        for _ in range(attempts):
            try:
                return fn()
            except TransportError:
                self._restart_if_dead()
                time.sleep(0.05)
        raise EngineError("the server stayed unreachable")

    def _restart_if_dead(self) -> None:
        if self.server is not None and self.server.process is not None and self.server.process.poll() is not None:
            if self.points and self.server_armed == f"crash point {self.points[0]}":
                self.points.pop(0)
            how = self.server_armed or f"exited with {self.server.process.returncode}"
            self.kills.append(_Kill(time.monotonic() - self.t0, "server", how, done=True))
            self._say(f"server died ({how}); restarting")
            self.server.kill()
            self._start_server()

    def _note_traffic(self, admin: AdminApi) -> None:
        try:
            stats = admin.stats()
        except (TransportError, RemoteError):
            return
        self.traffic[int(stats["pid"])] = stats["traffic"]
        boot = stats["boot"]
        if boot not in self.recovery:
            self.recovery.append(boot)

    def _watch(self, admin: AdminApi, job_id: str, started: float) -> dict[str, Any]:
        last = ""
        seen: str | None = None
        while True:
            if time.monotonic() - started > self.o.timeout:
                raise EngineError(f"job {job_id} did not end within {self.o.timeout:g} s")
            elapsed = time.monotonic() - started
            for kill in self.kills:
                if not kill.done and kill.at_s <= elapsed:
                    kill.done = True
                    self._note_traffic(admin)
                    if kill.target == "server":
                        self._kill_server(kill.how)
                    else:
                        self._kill_client(kill.target)
            self._restart_if_dead()
            for site, proc in list(self.clients.items()):
                if proc.poll() is not None and site not in self.left and self.clients[site] is proc:
                    armed = self.client_armed[site]
                    if armed is not None and proc.returncode == -signal.SIGKILL:
                        self.kills.append(_Kill(time.monotonic() - self.t0, site, armed, done=True))
                        self.client_armed[site] = None
                        if armed.startswith("crash point"):
                            _, leave = self.site_points[site].pop(0)
                            if leave:
                                self.left.add(site)
                                self._say(f"{site} SIGKILLed ({armed}); it left for good")
                                continue
                        self.client_restarts[site] += 1
                        self._say(f"{site} SIGKILLed ({armed}); restarting")
                    else:
                        self._say(f"{site} exited with {proc.returncode}; restarting")
                    self._start_client(site)
            server_dies = bool(self.points or self.server_appends
                               or any(k.target == "server" and not k.done for k in self.kills))
            # with faults to inject, look every 0.1 s (kills land on time, dead sites restart at
            # once); otherwise long-poll: the server answers when the job changed, at the latest
            # after a second (a site that died on its own is restarted within it)
            eager = server_dies or any(not k.done for k in self.kills) or any(self.client_armed.values())
            try:
                if eager:
                    job = admin.show_job(job_id)
                else:
                    job, seen = admin.watch_job(job_id, seen, 1.0)
                if server_dies:
                    self._note_traffic(admin)  # an incarnation about to die: its counts die with it
            except TransportError:
                time.sleep(0.05)
                continue
            task = job.get("current_task")
            text = f"{job['state']} round {job['rounds']}" + (
                f", {task['name']} {task['results']}/{len(task['targets'])} results" if task else "")
            if text != last:
                self._say(f"{job_id}: {text}")
                last = text
            if job["state"] in _TERMINAL:
                return job
            if eager:
                time.sleep(0.1)  # each look costs the server a query: 10 a second is plenty

    def _stop_all(self) -> None:
        for proc in {id(p): p for p in self.clients.values()}.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        if self.server is not None and self.server.process is not None and self.server.process.poll() is None:
            # at once, not after the sites: a closing server answers their long polls, so they stop now
            self.server.process.send_signal(signal.SIGTERM)
        for proc in self.clients.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        resubmitted = self._resubmitted()
        for site in self.clients:
            self.client_stats[site] = self._client_counts(site, resubmitted.get(site, 0))
        if self.server is not None:
            self.server.stop()

    def _resubmitted(self) -> dict[str, int]:
        """Re-submissions per site, from the stop lines of every client process (shared or not) that ran."""
        out: dict[str, int] = {}
        for path in sorted((self.workdir / "logs").glob("*.out")):
            for line in path.read_bytes().splitlines():
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("site"), str):
                    out[entry["site"]] = out.get(entry["site"], 0) + int(entry.get("resubmitted", 0))
        return out

    def _client_counts(self, site: str, resubmitted: int) -> dict[str, Any]:
        """The site's counts, from its local log (which survives its kills) and its stop lines."""
        counts: dict[str, Any] = {"executed": 0, "submitted": 0, "dropped": 0, "failed": 0,
                                  "resubmitted": resubmitted}
        by_trigger = {"compute": "executed", "acknowledge": "submitted", "drop": "dropped", "fail": "failed"}
        db = self.workdir / f"{site}.db"
        if db.exists():
            for trigger, n in count_triggers(db, "site_task").items():
                if trigger in by_trigger:
                    counts[by_trigger[trigger]] += n
        return counts

    def _summary(self, job: dict[str, Any], wall: float, result: dict[str, Any],
                 sites: dict[str, str]) -> dict[str, Any]:
        bytes_in = sum(t["bytes_in"] for t in self.traffic.values())
        bytes_out = sum(t["bytes_out"] for t in self.traffic.values())
        summary = {
            "job_id": job["job_id"], "name": job["name"], "status": job["state"], "reason": job.get("reason"),
            "rounds": job["rounds"], "wall_s": round(wall, 3), "result_hash": job.get("result_hash"),
            "result": result.get("result"),
            "bytes": {"to_server": bytes_in, "from_server": bytes_out},
            "server_starts": self.server_starts,
            "boots": [{k: b[k] for k in ("boot_s", "events", "standing_tasks", "resumed_job")}
                      for b in self.recovery],
            "kills": [{"target": k.target, "how": k.how, "at_s": round(k.at_s, 3)} for k in self.kills if k.done],
            "kills_not_reached": [{"target": k.target, "how": k.how} for k in self.kills if not k.done]
            + [{"target": "server", "how": self.server_armed}] * (self.server_armed is not None
                                                                    and "appended" in self.server_armed)
            + [{"target": site, "how": how} for site, how in self.client_armed.items() if how is not None]
            + [{"target": "server", "how": f"crash point {p}"} for p in self.points]
            + [{"target": "server", "how": how} for _, how in self.server_appends]
            + [{"target": site, "how": how} for site, left in self.client_appends.items() for _, how in left],
            "sites": {site: {"state": sites.get(site, "unknown"), "restarts": self.client_restarts[site],
                             "left": site in self.left,
                             **{k: self.client_stats.get(site, {}).get(k, 0)
                                for k in ("executed", "submitted", "resubmitted", "dropped", "failed")}}
                      for site in self.sites},
            "workdir": str(self.workdir) if (self.o.keep or not self.own_workdir) else None,
        }
        if self.own_workdir and not self.o.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return summary


def simulate(options: SimOptions) -> dict[str, Any]:
    """Run one simulation and return its summary."""
    return Simulation(options).run()


def format_summary(s: dict[str, Any]) -> str:
    """The summary for people."""
    lines = [f"job {s['job_id']} ({s['name']}): {s['status']} after {s['rounds']} round(s) in {s['wall_s']:.2f} s"
             + (f" — {s['reason']}" if s.get("reason") else ""),
             f"result hash: {s['result_hash']}",
             f"traffic: {s['bytes']['to_server']} bytes to the server, {s['bytes']['from_server']} bytes back"]
    if s["kills"]:
        lines.append(f"kills: {len(s['kills'])} ({'; '.join(k['target'] + ' ' + k['how'] for k in s['kills'])});"
                     f" server started {s['server_starts']} time(s)")
        for boot in s["boots"][1:]:
            lines.append(f"  recovery: {boot['boot_s'] * 1000:.0f} ms over {boot['events']} events, "
                         f"{boot['standing_tasks']} standing task(s), resumed {boot['resumed_job']}")
    if s["kills_not_reached"]:
        lines.append(f"not reached before the job ended: {len(s['kills_not_reached'])} kill(s)")
    for site, st in s["sites"].items():
        lines.append(f"  {site}: {st['state']}, executed {st['executed']}, submitted {st['submitted']}, "
                     f"re-submitted {st['resubmitted']}, restarts {st['restarts']}")
    if s.get("workdir"):
        lines.append(f"work folder (logs of server and sites): {s['workdir']}")
    return "\n".join(lines)
