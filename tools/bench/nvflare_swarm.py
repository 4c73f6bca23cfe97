"""NVFlare 2.9's swarm learning on the workload of ``tools/bench/swarm.py``, in NVFlare's simulator.

The job: the 34.1 MiB MLP (``engine.jobs.mlp``: hidden 2048, depth 3, float32); N sites,
every one a trainer and an aggregation candidate; each round every site takes one SGD
step (batch 64, lr 0.01) from the round's model on synthetic data seeded by site and
round, with one torch thread; the aggregating site waits for all N results
(``min_responses_required`` = N), then at most 5 s (``wait_time_after_min_resps_received``),
and accepts at most 2 uploads at once (``max_concurrent_submissions``). No cross-site
evaluation and no best-model selection (fedlog's trainer reports no metric either).

NVFlare's side is its ``SwarmLearningRecipe`` for PyTorch (client-controlled workflow:
``SwarmServerController`` on the server, ``SwarmClientController`` on every site, a
``PTFileModelPersistor``, ``SimpleModelShareableGenerator`` and
``InTimeAccumulateWeightedAggregator``), the client script using the Client API in
process (the same script as the FedAvg comparison in ``vs_nvflare.py``, with one
step), run by ``SimEnv`` with one simulator thread per site. Models move between sites
in NVFlare's default ``aggregation_format``, numpy (``--format pytorch`` keeps them PyTorch
tensors; on a 2-core machine that was the slower of the two).

Measured: ``wall_s`` and ``peak_rss_bytes`` of the whole command (start-up included;
``vs_nvflare.run_measured``), and from the sites' own log lines, like fedlog's swarm
benchmark measures its rounds: ``round_s_each`` is, for each round, the time from the
first site's "Round r started." to the first site's "Round r+1 started." (the last
round: to the aggregator's "Swarm Learning Done"); ``round_s`` is their mean.

Usage: ``python tools/bench/nvflare_swarm.py [--sites 4] [--rounds 2] [--venv build/bench-nvflare-venv]``
(the venv, torch and nvflare only, is made on first use by ``vs_nvflare.nvflare_venv``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import vs_nvflare  # noqa: E402

NVFLARE_VERSION = vs_nvflare.NVFLARE_VERSION
HIDDEN, DEPTH = 2048, 3
STEPS, BATCH, LR = 1, 64, 0.01
WAIT_AFTER_MIN = 5
MAX_SUBMISSIONS = 2
JOB_NAME = "mlp_swarm"


def model_bytes(hidden: int = HIDDEN, depth: int = DEPTH) -> int:
    params = (256 * hidden + hidden) + (depth - 1) * (hidden * hidden + hidden) + (hidden * 10 + 10)
    return params * 4


# The job definition, run with the NVFlare venv's python: argv = here workspace sites rounds hidden depth format.
SWARM_JOB = '''
import sys
sys.path.insert(0, sys.argv[1])
from mlp_model import MLP
from nvflare.app_opt.pt.recipes.swarm import SwarmLearningRecipe
from nvflare.client.config import ExchangeFormat
from nvflare.recipe import SimEnv

here, workspace = sys.argv[1], sys.argv[2]
sites, rounds, hidden, depth = map(int, sys.argv[3:7])
fmt = ExchangeFormat.PYTORCH if sys.argv[7] == "pytorch" else ExchangeFormat.NUMPY
names = [f"site-{i + 1}" for i in range(sites)]
recipe = SwarmLearningRecipe(
    name="@JOB@",
    model=MLP(hidden, depth),
    num_rounds=rounds,
    train_script=f"{here}/client.py",
    train_args={"script_args": f"--steps @STEPS@ --batch @BATCH@ --lr @LR@ --hidden {hidden} --depth {depth}"},
    min_clients=sites,
    max_concurrent_submissions=@MAXSUB@,
    aggregation_format=fmt,
    key_metric=None,
    server_config_overrides={"train_clients": names, "aggr_clients": names, "configure_task_timeout": 120},
    client_config_overrides={"wait_time_after_min_resps_received": @WAIT@},
)
run = recipe.execute(SimEnv(clients=names, num_threads=sites, workspace_root=workspace))
status = run.get_status() if hasattr(run, "get_status") else "done"
print("NVFLARE_STATUS", status)
'''
for _key, _value in {"@JOB@": JOB_NAME, "@STEPS@": STEPS, "@BATCH@": BATCH, "@LR@": LR,
                     "@MAXSUB@": MAX_SUBMISSIONS, "@WAIT@": WAIT_AFTER_MIN}.items():
    SWARM_JOB = SWARM_JOB.replace(_key, str(_value))

_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[,.]\d{3})")
_STARTED = re.compile(r"Round (\d+) started\.")
_DONE = re.compile(r"Swarm Learning Done")


def _stamp(line: str) -> float | None:
    m = _STAMP.match(line)
    if not m:
        return None
    return datetime.strptime(m.group(1).replace(",", "."), "%Y-%m-%d %H:%M:%S.%f").timestamp()


def _site_logs(workspace: Path) -> list[Path]:
    found = [p for p in workspace.rglob("log.txt") if re.fullmatch(r"site-\d+", p.parent.name)]
    return sorted(found)


def round_times(workspace: Path) -> tuple[dict[int, float], float | None]:
    """(round -> first 'Round r started.' time over all sites, last 'Swarm Learning Done' time)."""
    starts: dict[int, float] = {}
    done: float | None = None
    for log in _site_logs(workspace):
        for line in log.read_text(errors="replace").splitlines():
            m = _STARTED.search(line)
            if m:
                ts = _stamp(line)
                if ts is not None:
                    r = int(m.group(1))
                    starts[r] = min(starts.get(r, ts), ts)
            elif _DONE.search(line):
                ts = _stamp(line)
                if ts is not None:
                    done = ts if done is None else max(done, ts)
    return starts, done


def _errors(workspace: Path, text: str) -> str:
    """The ERROR lines of the sites' and server's logs (for a failure message)."""
    lines = [ln for ln in text.splitlines() if " ERROR " in ln or "Error" in ln or "Traceback" in ln]
    for log in sorted(workspace.rglob("log.txt")):
        lines += [f"{log.parent.name}: {ln}" for ln in log.read_text(errors="replace").splitlines() if " ERROR " in ln]
    return "\n".join(lines[-40:])


# NVFlare's simulator picks each client worker's port by binding port 0 and closing it, then
# connects to it while the worker starts; with many sites starting at once, a site's connection
# is now and then reset ("Communication error with client site-N: [Errno 104] Connection reset
# by peer"), that site never starts, and the run aborts when the swarm's configuration task
# times out. Such a run is retried (once), and the result says so.
_STARTUP_RACE = "Communication error with client"


def run_nvflare_swarm(python: Path, sites: int, rounds: int, work: Path, fmt: str = "numpy",
                      timeout: float = 3600, attempts: int = 2) -> dict[str, Any]:
    """Run NVFlare's swarm job in its simulator; wall time, peak RSS and per-round times."""
    failures: list[str] = []
    for attempt in range(1, attempts + 1):
        try:
            result = _run_once(python, sites, rounds, Path(work) / f"attempt-{attempt}", fmt, timeout)
        except RuntimeError as exc:
            if _STARTUP_RACE not in str(exc) or attempt == attempts:
                raise
            failures.append(next(ln for ln in str(exc).splitlines() if _STARTUP_RACE in ln).strip())
            continue
        result["attempts"] = attempt
        if failures:
            result["retried_because"] = failures
        return result
    raise AssertionError("unreachable")


def _run_once(python: Path, sites: int, rounds: int, work: Path, fmt: str, timeout: float) -> dict[str, Any]:
    job = Path(work) / f"nvflare-swarm-{sites}-{rounds}-{fmt}"
    if job.exists():
        shutil.rmtree(job)
    job.mkdir(parents=True)
    (job / "mlp_model.py").write_text(vs_nvflare.NVF_MODEL)
    (job / "client.py").write_text(vs_nvflare.NVF_CLIENT)
    (job / "job.py").write_text(SWARM_JOB)
    workspace = job / "workspace"
    env = {**os.environ, "PYTHONPATH": str(job), "OMP_NUM_THREADS": "1"}
    started = time.time()
    try:
        wall, peak, text = vs_nvflare.run_measured(
            [str(python), str(job / "job.py"), str(job), str(workspace), str(sites), str(rounds), str(HIDDEN),
             str(DEPTH), fmt], env=env, cwd=str(job), timeout=timeout)
    except RuntimeError as exc:
        raise RuntimeError(f"NVFlare swarm ({sites} sites, {rounds} rounds) failed: {exc}\n"
                           f"log errors:\n{_errors(workspace, '')}") from None
    (job / "output.txt").write_text(text)
    status_line = next((ln for ln in text.splitlines() if ln.startswith("NVFLARE_STATUS")), None)
    if status_line is None:
        raise RuntimeError(f"NVFlare swarm did not report completion:\n{text[-3000:]}")
    starts, done = round_times(workspace)
    if sorted(starts) != list(range(rounds)) or done is None:
        raise RuntimeError(f"NVFlare swarm did not run all {rounds} rounds (rounds started: {sorted(starts)}, "
                           f"done: {done is not None}):\n{_errors(workspace, text)}")
    marks = [starts[r] for r in range(rounds)] + [done]
    each = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {"sites": sites, "rounds": rounds, "model_mib": round(model_bytes() / (1 << 20), 2),
            "model_bytes": model_bytes(), "exchange_format": fmt,
            "wall_s": round(wall, 3), "round_s": round(sum(each) / len(each), 3),
            "round_s_each": [round(x, 3) for x in each],
            "round_s_from": "sites' log lines: first 'Round r started.' to the next round's (last: 'Swarm Learning Done')",
            "startup_s": round(starts[0] - started, 3), "after_last_round_s": round(started + wall - done, 3),
            "peak_rss_bytes": peak, "status": "finished",
            "nvflare_status": status_line.split(None, 1)[1] if " " in status_line else "",
            "cores": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--venv", default="build/bench-nvflare-venv", help="NVFlare's own venv (made if missing)")
    parser.add_argument("--format", choices=("numpy", "pytorch"), default="numpy",
                        help="how models move between sites (NVFlare's aggregation_format)")
    parser.add_argument("--work", help="keep the job and NVFlare's workspace here (default: a temporary directory)")
    args = parser.parse_args()
    python = vs_nvflare.nvflare_venv(Path(args.venv).resolve())
    if args.work:
        result = run_nvflare_swarm(python, args.sites, args.rounds, Path(args.work).resolve(), args.format)
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="fedlog-nvflare-swarm-") as tmp:
            result = run_nvflare_swarm(python, args.sites, args.rounds, Path(tmp), args.format)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
