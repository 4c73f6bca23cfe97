"""The commands as users run them: ``fedlog server``, ``fedlog client``, ``fedlog job``, ``fedlog simulate``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.provision import SERVER_DIR, provision
from engine.server.serve import ServerProcess

pytestmark = pytest.mark.slow


def fedlog(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=240, check=check)


def test_simulate_json_summary(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("workflow: fedavg\nexecutor: engine.jobs.linreg:train\n"
                    "args: {model: {w: [0,0,0,0,0,0,0,0,0,0], b: 0}, rounds: 2}\n")
    out = fedlog("simulate", str(spec), "--clients", "2", "--json").stdout
    summary = json.loads(out)
    assert summary["status"] == "finished" and summary["rounds"] == 2
    assert summary["job_id"] == "job-1" and summary["wall_s"] > 0
    assert summary["result_hash"].startswith("sha256:")
    assert set(summary["sites"]) == {"site-1", "site-2"}
    assert all(s["executed"] == 2 and s["submitted"] == 2 for s in summary["sites"].values())
    again = json.loads(fedlog("simulate", str(spec), "--clients", "2", "--json", "--kill-server-at", "1.result").stdout)
    assert again["result_hash"] == summary["result_hash"]
    assert [k["how"] for k in again["kills"]] == ["crash point 1.result"]


def test_simulate_refuses_bad_arguments(tmp_path: Path) -> None:
    bad = fedlog("simulate", "linreg", "--kill-server-at", "1.lunch", check=False)
    assert bad.returncode == 2 and "PHASE one of dispatch, result, aggregate" in bad.stderr
    missing = fedlog("simulate", "no-such-job", check=False)
    assert missing.returncode == 2 and "neither a built-in job" in missing.stderr
    zero = fedlog("simulate", "linreg", "--kill-server-after-events", "0", check=False)
    assert zero.returncode == 2 and "--kill-server-after-events takes counts >= 1, got [0]" in zero.stderr


def test_server_refuses_bad_served_chunk_settings_before_opening_anything(tmp_path: Path) -> None:
    provision(tmp_path / "fed", ["site-1"])
    base = ["server", "--credentials", str(tmp_path / "fed" / SERVER_DIR), "--db", str(tmp_path / "s.db"),
            "--port", "0", "--no-tls"]
    for flag, value, says in [("--served-mib", "-1", "--served-mib is a number of MiB >= 0, got -1"),
                              ("--served-idle", "0", "--served-idle is a number of seconds > 0, got 0.0"),
                              ("--served-idle", "inf", "--served-idle is a number of seconds > 0, got inf")]:
        bad = fedlog(*base, flag, value, check=False)
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed"]  # no log, no chunk store


def test_server_client_and_job_commands(tmp_path: Path) -> None:
    provision(tmp_path / "fed", ["site-1"])
    server = ServerProcess(["server", "--credentials", str(tmp_path / "fed" / SERVER_DIR), "--db",
                            str(tmp_path / "server.db"), "--port", "0"], module="engine.cli").start()
    client = None
    client_out = ""
    try:
        admin = ["job", "--identity", str(tmp_path / "fed" / "admin"), "--server", server.url]
        submitted = json.loads(fedlog(*admin, "--json", "submit", "linreg").stdout)
        assert submitted["state"] == "submitted" and submitted["job_id"] == "job-1"
        second = json.loads(fedlog(*admin, "--json", "submit", "linreg").stdout)
        client = subprocess.Popen([sys.executable, "-m", "engine.cli", "client", "--identity",
                                   str(tmp_path / "fed" / "site-1"), "--server", server.url, "--poll-wait", "1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        waited = fedlog(*admin, "--json", "submit", "linreg", "--wait", check=False)
        aborted = fedlog(*admin, "abort", second["job_id"], "--reason", "enough", check=False)
        listing = fedlog(*admin, "list").stdout
        shown = json.loads(fedlog(*admin, "--json", "show", "job-1").stdout)
        result = json.loads(fedlog(*admin, "result", "job-1").stdout)
    finally:
        if client is not None:
            client.terminate()
            client_out = client.communicate(timeout=30)[0].decode()
        server.stop()
    assert shown["state"] == "finished" and shown["rounds"] == 5
    assert len(result["result"]["w"]) == 10
    assert "job-1" in listing and "job-3" in listing
    assert waited.returncode in (0, 1)  # job-3 ran after job-2 was aborted, or was still queued behind it
    assert aborted.returncode == 0 or "already ended" in aborted.stderr or "not legal" in aborted.stderr
    assert client.returncode == 0
    stopped = json.loads(client_out.strip().splitlines()[-1])
    assert stopped["event"] == "stopped" and stopped["site"] == "site-1" and stopped["submitted"] >= 5


def test_preload_imports_the_module_and_runs_its_warm_up(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    module = tmp_path / "warmmod.py"
    module.write_text(textwrap.dedent("""
        import pathlib
        def warm_up():
            pathlib.Path(__file__).with_name("warmed").write_text("yes")
    """))
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "from engine.commands.client import _preload; _preload(['warmmod', 'no.such.module']).join(60)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / "warmed").read_text() == "yes"
