"""Swarm learning benchmark: round time and bytes per round against the relayed-traffic bound and the relay floor.

For 4 and 8 sites, a 34 MiB MLP (``engine.jobs.mlp``: hidden 2048, depth 3) and 5
rounds (``--quick``: 2), ``fedlog simulate`` runs the built-in ``swarm`` workflow
with every site a trainer and every trainer required; each trainer takes one SGD
step on synthetic data, so every weight (every chunk) changes every round and
deduplication hides nothing. From the sites' own logs:

- ``round_s``: the mean time from one round's learn task to the next's (the last
  round: to the swarm's end), on the site that saw it first, with every site in a
  process of its own (as deployed; ``--process-per-site``);
  ``shared_process_round_s``: the same with the sites sharing one client process
  (``fedlog simulate``'s default), which must end with the same model;
- ``bytes_per_round``: the chunk bytes the stream sessions of each round moved
  (trainer uploads, the aggregator's downloads, the aggregate's upload, and the next
  round's model downloads), averaged over the rounds that have a next round;
- ``bound_bytes_per_round``: (3N − 2) × model bytes.

In the same run, ``relay_floor_s``: the same bytes moved by N processes through a
fresh server's chunk routes alone (1 MiB chunks, 4 requests in flight per process,
blake3-verified into a local chunk store, synced): N − 1 uploads, one process
downloading them, one upload, N − 1 downloads — the phases in sequence, as a round
orders them (a swarm aggregator may already download one result while others upload,
so the floor is, if anything, high). Also ``compute_floor_s``: the CPU a round needs
besides moving bytes (N trainers' model load, SGD step and result packing, divided by
the cores, plus the aggregator's weighted mean), measured in this process; and
``round_floor_s`` = relay floor + compute floor, below which no round can go here.
JSON on stdout.

Side by side, NVFlare 2.9's swarm on the same job (``nvflare_swarm.py``: its
``SwarmLearningRecipe`` in its simulator, in the benchmark's own venv with
torch==2.13.0 installed first): its ``round_s`` measured the same way, from its sites'
log lines, and ``speedup_per_round`` = NVFlare's round / fedlog's. ``--skip-nvflare``
leaves it out, and so does ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MIB = 1 << 20
HIDDEN, DEPTH = 2048, 3  # 34 MiB of float32


def spec(sites: int, rounds: int) -> dict[str, Any]:
    return {"name": f"swarm bench {sites} sites", "workflow": "swarm", "executor": "engine.swarm.site:run",
            "args": {"model": "engine.jobs.mlp:initial_state", "model_args": {"hidden": HIDDEN, "depth": DEPTH},
                     "learner": "engine.jobs.mlp:train", "learner_args": {"steps": 1, "batch": 64},
                     "num_rounds": rounds, "min_responses_required": sites,
                     "wait_time_after_min_resps_received": 5, "max_concurrent_submissions": 2}}


def _site_events(db: Path) -> list[Any]:
    from engine.log.sql import open_recorder

    with open_recorder(db) as log:
        return list(log.read())


def measure_run(work: Path, sites: int, rounds: int, process_per_site: bool = True) -> dict[str, Any]:
    from engine.sim import SimOptions, simulate

    summary = simulate(SimOptions(spec=spec(sites, rounds), clients=sites, workdir=work, timeout=1800,
                                  process_per_site=process_per_site))
    if summary["status"] != "finished":
        raise SystemExit(f"the swarm run failed: {summary['reason']}")
    starts: dict[int, int] = {}
    end_us = 0
    moved: dict[int, int] = {}
    for i in range(1, sites + 1):
        for e in _site_events(work / f"site-{i}.db"):
            mid = e.machine_id
            if e.kind == "swarm_round" and e.trigger == "create":
                if mid.endswith(":train"):
                    r = int(mid.split(":")[-2])
                    starts[r] = min(starts.get(r, e.ts_us), e.ts_us)
                elif mid.endswith(":end"):
                    end_us = max(end_us, e.ts_us)
            if e.kind in ("stream_send", "stream_receive") and e.trigger == "ack" and ":swarm:" in f":{mid}":
                body = mid.split(":", 1)[1]  # swarm:<job>:<round>:<role>...
                parts = body.split(":")
                if len(parts) < 4 or not parts[2].isdigit():
                    continue  # the end's model downloads by result clients: after the last round
                r = int(parts[2])
                if e.kind == "stream_receive" and parts[3].startswith("train"):
                    r -= 1  # downloading round r's model is round r-1's scatter traffic
                moved[r] = moved.get(r, 0) + int((e.data or {}).get("bytes", 0))
    ordered = [starts[r] for r in sorted(starts)] + [end_us]
    round_s = [(b - a) / 1e6 for a, b in zip(ordered, ordered[1:], strict=False)]
    steady = [moved.get(r, 0) for r in range(rounds - 1)] or [moved.get(0, 0)]
    return {"wall_s": summary["wall_s"], "round_s_each": [round(x, 3) for x in round_s],
            "round_s": round(sum(round_s) / len(round_s), 3),
            "bytes_per_round_each": [moved.get(r, 0) for r in range(rounds)],
            "bytes_per_round": int(sum(steady) / len(steady)), "server_bytes_total": summary["bytes"],
            "model_hash": summary["result"]["model_hash"]}


# -- the relay floor ----------------------------------------------------------------------------------


def _worker(role: str, url: str, token: str, arg: str, workdir: str) -> int:
    """One process of the floor: ``upload`` a seeded model, or ``download`` comma-separated manifests."""
    from engine.chunks import LocalChunkStore
    from engine.client.transport import HttpTransport
    from engine.tensors import Manifest, pack

    transport = HttpTransport(url, token, timeout=120)
    store = LocalChunkStore(Path(workdir) / "chunks")
    if role == "upload":
        import torch

        from engine.jobs.mlp import initial_state

        packed = pack(initial_state(HIDDEN, DEPTH, seed=int(arg)))
        chunks = packed.chunks
        manifest_bytes = packed.manifest.to_bytes()
        digest = packed.digest
        del torch
        started = time.time()
        missing = transport.request("POST", "/v1/chunks/missing", json={"digests": list(chunks)}).json()["missing"]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda d: transport.request("PUT", f"/v1/chunks/{d}", body=chunks[d]), missing))
        transport.request("PUT", f"/v1/chunks/{digest}", body=manifest_bytes)
        moved = sum(len(chunks[d]) for d in missing)
    else:
        started = time.time()
        moved = 0
        for digest in arg.split(","):
            manifest = Manifest.from_bytes(transport.request("GET", f"/v1/chunks/{digest}").body)

            def get(d: str) -> int:
                data = transport.request("GET", f"/v1/chunks/{d}").body
                store.put(d, data)  # verified against its address
                return len(data)

            with ThreadPoolExecutor(4) as pool:
                moved += sum(pool.map(get, manifest.chunk_digests()))
        store.sync()
        digest = ""
    print(json.dumps({"started": started, "ended": time.time(), "bytes": moved, "digest": digest}), flush=True)
    store.close()
    return 0


def _phase(url: str, token: str, jobs: list[tuple[str, str]], work: Path) -> tuple[float, list[dict[str, Any]]]:
    procs = []
    for i, (role, arg) in enumerate(jobs):
        d = work / f"w{time.monotonic_ns()}-{i}"
        d.mkdir(parents=True)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", role, url, token, arg, str(d)],
                                      stdout=subprocess.PIPE))
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a floor worker failed ({p.returncode})")
        outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    return max(o["ended"] for o in outs) - min(o["started"] for o in outs), outs


def relay_floor(work: Path, sites: int) -> dict[str, Any]:
    from engine.provision import SERVER_DIR, load_identity, provision
    from engine.server.serve import ServerProcess

    provision(work / "fed", ["site-1"])
    server = ServerProcess(["server", "--credentials", str(work / "fed" / SERVER_DIR), "--db", str(work / "s.db"),
                            "--port", "0", "--no-tls"], module="engine.cli").start(timeout=60)
    token = load_identity(work / "fed" / "admin").token
    try:
        up, outs = _phase(server.url, token, [("upload", str(100 + i)) for i in range(sites - 1)], work)
        down, _ = _phase(server.url, token, [("download", ",".join(o["digest"] for o in outs))], work)
        up2, outs2 = _phase(server.url, token, [("upload", "999")], work)
        down2, _ = _phase(server.url, token, [("download", outs2[0]["digest"])] * (sites - 1), work)
    finally:
        server.stop()
    return {"relay_floor_s": round(up + down + up2 + down2, 3),
            "relay_floor_phases_s": [round(x, 3) for x in (up, down, up2, down2)]}


def compute_floor(work: Path, sites: int) -> dict[str, Any]:
    """The CPU a round needs besides moving bytes, measured here in one process, warm.

    Per trainer: load the global model from a chunk store, one SGD step
    (``engine.jobs.mlp.local_steps``), pack and store the result (blake3 on every chunk);
    the N trainers run in parallel, so they cost ``N x that / cores``. Then the
    aggregator loads the N results and takes their weighted mean, packed and stored:
    one process, so that is serial. ``round_floor_s`` = relay floor + both: on this
    machine no round can be shorter.
    """
    import torch

    from engine.chunks import LocalChunkStore
    from engine.jobs.mlp import initial_state, local_steps
    from engine.tensors import load, pack
    from engine.tensors import store as store_packed
    from engine.workflows.builtin import weighted_mean_tensors

    torch.set_num_threads(1)
    chunks = LocalChunkStore(work / "compute-floor")
    model = store_packed(pack(initial_state(HIDDEN, DEPTH)), chunks)
    local_steps(load(chunks, model), "warm-up", 0, steps=1)  # torch's one-time set-up is not a round's cost
    started = time.perf_counter()
    results = []
    for i in range(sites):
        new = local_steps(load(chunks, model), f"site-{i + 1}", 1, steps=1, batch=64)
        results.append(store_packed(pack(new), chunks))
        chunks.sync()
    train_cpu = time.perf_counter() - started
    started = time.perf_counter()
    mean, _, _ = weighted_mean_tensors({f"site-{i + 1}": {"model": load(chunks, d), "n": 64}
                                        for i, d in enumerate(results)})
    store_packed(pack(mean), chunks)
    chunks.sync()
    aggregate = time.perf_counter() - started
    chunks.close()
    cores = os.cpu_count() or 1
    return {"train_cpu_s": round(train_cpu, 3), "aggregate_s": round(aggregate, 3),
            "compute_floor_s": round(train_cpu / min(cores, sites) + aggregate, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5 (about a minute per config)")
    parser.add_argument("--sites", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--skip-nvflare", action="store_true", help="measure fedlog and the floors only")
    parser.add_argument("--venv", default="build/bench-nvflare-venv", help="NVFlare's own venv (made if missing)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(*args.worker)
    sys.path.insert(0, str(Path(__file__).parent))
    import nvflare_swarm
    import vs_nvflare

    # --quick stays about a minute: NVFlare's own start-up alone takes 10-16 s per run here
    python = None if args.skip_nvflare or args.quick else vs_nvflare.nvflare_venv(Path(args.venv).resolve())
    vs_nvflare.fedlog_bytecode()  # fedlog measured as installed, as NVFlare is
    from engine.jobs.mlp import initial_state

    model_bytes = sum(t.numel() * t.element_size() for t in initial_state(HIDDEN, DEPTH).values())
    rounds = 2 if args.quick else 5
    configs = []
    for n in args.sites:
        with tempfile.TemporaryDirectory(prefix="fedlog-swarm-bench-") as tmp:
            print(f"[swarm] {n} sites, {rounds} rounds", file=sys.stderr, flush=True)
            run = measure_run(Path(tmp) / "run", n, rounds)
            print(f"[swarm] {n} sites sharing one client process", file=sys.stderr, flush=True)
            shared = measure_run(Path(tmp) / "shared", n, rounds, process_per_site=False)
            if shared["model_hash"] != run["model_hash"]:
                raise SystemExit("the two runs of the same seeded swarm ended with different models")
            print(f"[swarm] relay floor, {n} processes", file=sys.stderr, flush=True)
            floor = relay_floor(Path(tmp) / "floor", n)
            compute = compute_floor(Path(tmp), n)
            nvflare: dict[str, Any] = {}
            if python is not None:
                print(f"[swarm] NVFlare 2.9 swarm, {n} sites", file=sys.stderr, flush=True)
                try:
                    nvf = nvflare_swarm.run_nvflare_swarm(python, n, rounds, Path(tmp) / "nvflare")
                    nvflare = {"nvflare_round_s": nvf["round_s"], "nvflare_round_s_each": nvf["round_s_each"],
                               "nvflare_wall_s": nvf["wall_s"], "nvflare_peak_rss_bytes": nvf["peak_rss_bytes"],
                               "speedup_per_round": round(nvf["round_s"] / run["round_s"], 2)}
                except RuntimeError as exc:
                    nvflare = {"nvflare_error": str(exc)[-2000:]}
        bound = (3 * n - 2) * model_bytes
        configs.append({"sites": n, "model_mib": round(model_bytes / MIB, 2), "model_bytes": model_bytes,
                        "rounds": rounds, **run, **floor, **compute,
                        "shared_process_round_s": shared["round_s"],
                        "shared_process_round_s_each": shared["round_s_each"],
                        "round_floor_s": round(floor["relay_floor_s"] + compute["compute_floor_s"], 3),
                        "bound_bytes_per_round": bound,
                        "bytes_ratio_to_bound": round(run["bytes_per_round"] / bound, 4),
                        "round_minus_floor_s": round(run["round_s"] - floor["relay_floor_s"], 3),
                        "round_minus_round_floor_s": round(run["round_s"] - floor["relay_floor_s"]
                                                           - compute["compute_floor_s"], 3),
                        **nvflare,
                        "cores": os.cpu_count()})
    print(json.dumps({"bench": "swarm", "quick": args.quick, "configs": configs,
                      "nvflare": None if python is None else nvflare_swarm.NVFLARE_VERSION}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
