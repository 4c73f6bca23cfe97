"""Benchmark: the same FedAvg job in fedlog and in NVFlare 2.9's simulator, with the training floor.

The job (both systems): an MLP — Linear(256→H), ReLU, (D−1)× [Linear(H→H), ReLU],
Linear(H→10), float32 — H=1024, D=2 (1,323,018 parameters, 5.05 MiB) or H=2048,
D=3 (8,939,530, 34.1 MiB); 2 or 4 clients; 2 or 5 rounds; each round every client
runs 20 SGD steps (batch 64, lr 0.01) on synthetic data seeded by site and round,
with one torch thread, on the CPU; FedAvg weighted by examples.

- **fedlog**: ``fedlog simulate`` (a server process and the sites on loopback, each
  site with its own SQLite log, chunk store and connection; as ``fedlog simulate``
  does by default, the sites share one client process, a thread each, like NVFlare's
  simulator runs its clients in its own worker processes), the ``fedavg_torch``
  workflow and ``engine.jobs.mlp:train``. ``--process-per-site`` measures fedlog
  with a process per site as well (``fedlog_pps_*`` keys).
- **NVFlare**: its ``FedAvgRecipe`` for PyTorch run by ``SimEnv`` (the simulator),
  the client script using the Client API with the same compute as
  ``engine.jobs.mlp.local_steps`` (the same steps below). Both write the SGD step out
  (``param -= lr * grad``, bit-identical to ``torch.optim.SGD`` without momentum):
  ``torch.optim``'s first use imports torch's compiler stack, 1.5 s of CPU in every
  site process, which neither system needs. NVFlare is *not* a
  dependency of fedlog: the script makes its own venv (``--venv``, default
  ``build/bench-nvflare-venv``), installs ``torch==2.13.0`` first (the CPU build, so
  no CUDA build is pulled), then ``nvflare==2.9.0``.
- **Floor**: all sites' local steps of all rounds run back to back in this process
  (``serial_floor_s``); ``floor_s`` is that divided by min(cores, clients) — the time
  the training alone needs in parallel.

Both run as installed software: fedlog's modules are byte-compiled first, as ``pip
install`` compiles NVFlare's (``fedlog_bytecode``). Wall time is the whole command
(start-up included) for both; peak memory is the peak of the RSS summed over the
command's process tree, sampled every 50 ms the same way for both. ``overhead_s`` =
wall − floor. ``cpu_s`` is the CPU time (user + system) of the command and every
process it started and waited for (``RUSAGE_CHILDREN``), next to ``serial_floor_s``,
the CPU the training itself needs: on two cores both systems are CPU-bound, so this
figure shows where the overhead goes with less noise than the wall time.

``--repeat N`` measures the floor, fedlog and NVFlare N times each, in turn, and
reports the median of each, every run in the ``*_runs`` keys, and each ratio as the
median of the runs' ratios (each run's from its own floor, fedlog and NVFlare figures):
this machine's speed drifts by tens of percent within minutes.

Usage: ``python tools/bench/vs_nvflare.py [--quick] [--repeat N] [--only C:M:R] [--out FILE] [--venv DIR]``.
``--quick``: the 2-client, 5 MiB, 2-round configuration only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.jobs.mlp import initial_state, local_steps

NVFLARE_VERSION = "2.9.0"
TORCH_VERSION = "2.13.0"
MODELS = {5: (1024, 2), 34: (2048, 3)}  # model MiB -> (hidden, depth)
STEPS, BATCH, LR = 20, 64, 0.01

# The NVFlare side: a model class and a client script with the same compute as engine.jobs.mlp.
NVF_MODEL = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, hidden=1024, depth=2):
        super().__init__()
        self.hidden, self.depth = hidden, depth  # NVFlare rebuilds the model from these attributes
        layers = [nn.Linear(256, hidden), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
'''

NVF_CLIENT = '''
import argparse
import zlib

import torch
from torch import nn

import nvflare.client as flare
from mlp_model import MLP

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--hidden", type=int, default=1024)
parser.add_argument("--depth", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(1)
flare.init()
site = flare.get_site_name()
model = MLP(args.hidden, args.depth)
while flare.is_running():
    received = flare.receive()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in received.params.items()})
    generator = torch.Generator().manual_seed(zlib.crc32(f"{received.current_round}/{site}".encode()))
    params = list(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(args.steps):
        x = torch.randn(args.batch, 256, generator=generator)
        y = torch.randint(0, 10, (args.batch,), generator=generator)
        grads = torch.autograd.grad(loss_fn(model(x), y), params)
        with torch.no_grad():
            for param, grad in zip(params, grads):
                param.add_(grad, alpha=-args.lr)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not isinstance(next(iter(received.params.values())), torch.Tensor):
        params = {k: v.numpy() for k, v in params.items()}
    flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": args.steps * args.batch}))
'''

NVF_JOB = '''
import sys
sys.path.insert(0, sys.argv[1])
from mlp_model import MLP
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe import SimEnv

here, workspace, clients, rounds, hidden, depth = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
recipe = FedAvgRecipe(name="mlp_fedavg", model=MLP(hidden, depth), min_clients=clients, num_rounds=rounds,
                      train_script=f"{here}/client.py",
                      train_args=f"--steps {STEPS} --batch {BATCH} --lr {LR} --hidden {hidden} --depth {depth}")
run = recipe.execute(SimEnv(num_clients=clients, num_threads=clients, workspace_root=workspace))
print("NVFLARE_STATUS", run.get_status() if hasattr(run, "get_status") else "done")
'''.replace("{STEPS}", str(STEPS)).replace("{BATCH}", str(BATCH)).replace("{LR}", str(LR))


# -- process-tree memory --------------------------------------------------------------------

PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, ()))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _children_cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


@dataclass(frozen=True)
class Measured:
    """One run of a command: wall seconds, peak summed RSS of its tree, CPU seconds of its tree."""

    wall_s: float
    peak_rss_bytes: int
    cpu_s: float


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                 timeout: float = 1800) -> tuple[Measured, str]:
    """Run ``cmd``; return its measurements and its combined output.

    The CPU time is what ``RUSAGE_CHILDREN`` gained over the run: the command's and that
    of every descendant a parent waited for (both systems wait for their workers).
    """
    with tempfile.TemporaryFile() as out:
        cpu_before = _children_cpu_s()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, sum(_rss(p) for p in _tree(proc.pid)))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout)
        finally:
            wall = time.perf_counter() - start
            done.set()
            sampler.join()
        out.seek(0)
        text = out.read().decode(errors="replace")
    if rc != 0:
        raise RuntimeError(f"{cmd[:4]} exited {rc}:\n{text[-4000:]}")
    return Measured(wall, peak, _children_cpu_s() - cpu_before), text


# -- the three measurements -------------------------------------------------------------------

def floor(clients: int, model_mib: int, rounds: int) -> tuple[float, float]:
    """(serial floor, parallel floor) seconds: every site's local steps of every round, in this process."""
    hidden, depth = MODELS[model_mib]
    state = initial_state(hidden, depth)
    start = time.perf_counter()
    for r in range(rounds):
        for i in range(clients):
            local_steps(state, f"site-{i + 1}", r, STEPS, BATCH, LR)
    serial = time.perf_counter() - start
    return serial, serial / max(1, min(os.cpu_count() or 1, clients))


def fedlog_bytecode() -> list[str]:
    """Byte-compile the ``engine`` package the fedlog processes will import; return where it is.

    ``pip install`` compiles an installed package (NVFlare's venv has its bytecode, and
    so does the test command's venv for fedlog). Measured from a source checkout or an
    editable install in an environment that sets ``PYTHONDONTWRITEBYTECODE`` (as this
    machine's does), every fedlog process would instead compile ~120 modules from source
    at start, ~0.15 s of CPU each, which no installed fedlog pays. Both the package this
    interpreter finds and a checkout's ``engine/`` in the working directory (which a
    ``python -m engine`` started there imports first) are compiled.
    """
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("engine")
    places = list(spec.submodule_search_locations or []) if spec is not None else []
    here = Path.cwd() / "engine"
    if (here / "__init__.py").is_file() and str(here.resolve()) not in {str(Path(p).resolve()) for p in places}:
        places.append(str(here))
    for place in places:
        compileall.compile_dir(place, quiet=1)
    return places


def run_fedlog(clients: int, model_mib: int, rounds: int, work: Path, process_per_site: bool = False
               ) -> Measured:
    hidden, depth = MODELS[model_mib]
    spec = {"name": f"mlp-{model_mib}mib", "workflow": "fedavg_torch", "executor": "engine.jobs.mlp:train",
            "min_sites": clients,
            "args": {"model": "engine.jobs.mlp:initial_state", "model_args": {"hidden": hidden, "depth": depth},
                     "rounds": rounds, "steps": STEPS, "batch": BATCH, "lr": LR}}
    path = work / f"fedlog-{clients}-{model_mib}-{rounds}.json"
    path.write_text(json.dumps(spec))
    workdir = work / f"fedlog-run-{clients}-{model_mib}-{rounds}-{int(process_per_site)}"
    shutil.rmtree(workdir, ignore_errors=True)  # every run starts from nothing
    measured, text = run_measured([sys.executable, "-m", "engine", "simulate", str(path), "--clients", str(clients),
                                     "--json", "--workdir", str(workdir)]
                                    + ["--process-per-site"] * process_per_site, cwd=str(work))
    summary = json.loads(text.strip().splitlines()[-1])
    if summary.get("status") != "finished":
        raise RuntimeError(f"fedlog job did not finish: {summary}")
    return measured


def nvflare_venv(venv: Path) -> Path:
    """The benchmark's own venv with torch (CPU, pinned first) and nvflare; made on first use."""
    python = venv / "bin" / "python"
    ready = venv / ".fedlog-bench-ready"
    if ready.exists():
        return python
    print(f"setting up {venv} (torch=={TORCH_VERSION}, nvflare=={NVFLARE_VERSION}) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"torch=={TORCH_VERSION}", f"nvflare=={NVFLARE_VERSION}"], check=True)
    ready.write_text("ok\n")
    return python


def run_nvflare(python: Path, clients: int, model_mib: int, rounds: int, work: Path) -> Measured:
    hidden, depth = MODELS[model_mib]
    job = work / f"nvflare-{clients}-{model_mib}-{rounds}"
    job.mkdir(parents=True, exist_ok=True)
    (job / "mlp_model.py").write_text(NVF_MODEL)
    (job / "client.py").write_text(NVF_CLIENT)
    (job / "job.py").write_text(NVF_JOB)
    env = {**os.environ, "PYTHONPATH": str(job), "OMP_NUM_THREADS": "1"}
    shutil.rmtree(job / "workspace", ignore_errors=True)  # every run starts from nothing
    measured, text = run_measured([str(python), str(job / "job.py"), str(job), str(job / "workspace"),
                                     str(clients), str(rounds), str(hidden), str(depth)], env=env, cwd=str(job))
    if "NVFLARE_STATUS" not in text:
        raise RuntimeError(f"NVFlare run did not report completion:\n{text[-3000:]}")
    return measured


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def measure(clients: int, model_mib: int, rounds: int, work: Path, python: Path | None, repeat: int,
            process_per_site: bool) -> dict[str, Any]:
    """One configuration's JSON entry: the floor, fedlog and NVFlare, ``repeat`` times each, in turn."""
    serials: list[float] = []
    floors: list[float] = []
    fed: list[Measured] = []
    pps: list[Measured] = []
    nvf: list[Measured] = []
    for _ in range(repeat):
        serial, par = floor(clients, model_mib, rounds)
        serials.append(serial)
        floors.append(par)
        fed.append(run_fedlog(clients, model_mib, rounds, work))
        if process_per_site:
            pps.append(run_fedlog(clients, model_mib, rounds, work, process_per_site=True))
        if python is not None:
            nvf.append(run_nvflare(python, clients, model_mib, rounds, work))
    par = _median(floors)
    f_wall = _median([m.wall_s for m in fed])
    f_peak = int(statistics.median([m.peak_rss_bytes for m in fed]))
    entry: dict[str, Any] = {"clients": clients, "model_mib": model_mib, "rounds": rounds,
                             "serial_floor_s": _median(serials), "floor_s": par,
                             "fedlog_wall_s": f_wall, "fedlog_overhead_s": round(f_wall - par, 3),
                             "fedlog_cpu_s": _median([m.cpu_s for m in fed]),
                             "fedlog_peak_rss_bytes": f_peak}
    if repeat > 1:
        entry.update({"floor_s_runs": [round(x, 3) for x in floors],
                      "fedlog_wall_s_runs": [round(m.wall_s, 3) for m in fed]})
    if pps:
        entry.update({"fedlog_pps_wall_s": _median([m.wall_s for m in pps]),
                      "fedlog_pps_cpu_s": _median([m.cpu_s for m in pps]),
                      "fedlog_pps_peak_rss_bytes": int(statistics.median([m.peak_rss_bytes for m in pps]))})
    if nvf:
        n_wall = _median([m.wall_s for m in nvf])
        n_peak = int(statistics.median([m.peak_rss_bytes for m in nvf]))
        # each run's ratios from that run's floor, fedlog and NVFlare (measured within a minute of
        # each other), then their median: medians of the three series taken apart would pair
        # figures of different runs
        speedups = [n.wall_s / f.wall_s for f, n in zip(fed, nvf, strict=True)]
        overheads = [(f.wall_s - p) / max(1e-9, n.wall_s - p) for f, n, p in zip(fed, nvf, floors, strict=True)]
        memories = [f.peak_rss_bytes / n.peak_rss_bytes for f, n in zip(fed, nvf, strict=True)]
        entry.update({"nvflare_wall_s": n_wall, "nvflare_overhead_s": round(n_wall - par, 3),
                      "nvflare_cpu_s": _median([m.cpu_s for m in nvf]),
                      "nvflare_peak_rss_bytes": n_peak,
                      "wall_speedup": round(statistics.median(speedups), 2),
                      "overhead_ratio": round(statistics.median(overheads), 3),
                      "memory_ratio": round(statistics.median(memories), 3)})
        if repeat > 1:
            entry.update({"nvflare_wall_s_runs": [round(m.wall_s, 3) for m in nvf],
                          "wall_speedup_runs": [round(x, 2) for x in speedups],
                          "overhead_ratio_runs": [round(x, 3) for x in overheads],
                          "memory_ratio_runs": [round(x, 3) for x in memories]})
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 2-client 5 MiB 2-round configuration only")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--venv", default="build/bench-nvflare-venv", help="NVFlare's own venv (made if missing)")
    parser.add_argument("--skip-nvflare", action="store_true", help="measure fedlog and the floor only")
    parser.add_argument("--process-per-site", action="store_true",
                        help="also run fedlog with every site in a process of its own")
    parser.add_argument("--only", action="append", default=[], metavar="CLIENTS:MIB:ROUNDS",
                        help="run only this configuration (repeatable), e.g. 4:34:5")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="measure each system N times per configuration and report the medians")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    torch.set_num_threads(1)
    configs = [(2, 5, 2)] if args.quick else [(c, m, r) for m in (5, 34) for c in (2, 4) for r in (2, 5)]
    if args.only:
        configs = [tuple(int(x) for x in o.split(":")) for o in args.only]  # type: ignore[misc]
    python = None if args.skip_nvflare else nvflare_venv(Path(args.venv).resolve())
    fedlog_bytecode()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedlog-vs-nvflare-") as tmp:
        work = Path(tmp)
        for clients, model_mib, rounds in configs:
            entry = measure(clients, model_mib, rounds, work, python, args.repeat, args.process_per_site)
            print(json.dumps(entry), file=sys.stderr)
            results.append(entry)
    text = json.dumps({"configurations": results, "cores": os.cpu_count(), "repeat": args.repeat,
                       "nvflare": NVFLARE_VERSION,
                       "torch": torch.__version__}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
