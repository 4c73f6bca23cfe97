"""The server side stays torch-free: manifests without torch, numpy aggregation, model building in a child."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.chunks import MemoryChunkStore
from engine.errors import EngineError
from engine.tensors import Manifest, load, pack, store, unpack
from engine.workflows.builtin import weighted_mean_tensors
from engine.workflows.isolated import call_on_payload, make_payload


def test_the_warm_child_starts_before_the_server_imports_its_stack() -> None:
    # ``fedlog server --preload M``: the child imports torch while the server imports the
    # rest (SQL layer, uvicorn, numpy), so it is started before any of them is imported
    code = ("import subprocess, sys\n"
            "seen = []\n"
            "class Spawn:\n"
            "    def __init__(self, argv, **kw):\n"
            "        seen.append((argv, [m for m in ('numpy', 'uvicorn', 'sqlalchemy') if m in sys.modules]))\n"
            "    def poll(self):\n"
            "        return None\n"
            "subprocess.Popen = Spawn\n"
            "from engine.cli import main\n"
            "main(['server', '--credentials', '/nonexistent', '--db', ':memory:', '--preload', 'engine.jobs.mlp'])\n"
            "argv, heavy = seen[0]\n"
            "assert argv[-2:] == ['serve', 'engine.jobs.mlp'] and heavy == [], seen\n"
            "assert len(seen) == 1, seen\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_reading_manifests_and_serving_chunks_does_not_import_torch() -> None:
    code = ("import sys\n"
            "import engine.server.service, engine.server.chunk_routes, engine.workflows.builtin\n"
            "from engine.tensors import Manifest, refs_in\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numpy_arrays_pack_to_the_same_address_as_the_same_torch_tensors() -> None:
    g = torch.Generator().manual_seed(3)
    model = {"w": torch.randn(7, 5, generator=g), "b": torch.arange(5, dtype=torch.int16),
             "s": torch.tensor(2.5, dtype=torch.float64), "h": torch.randn(3, generator=g).half()}
    arrays = {k: v.numpy() for k, v in model.items()}
    assert pack(arrays).digest == pack(model).digest
    # a big-endian array is the same payload once in native order
    assert pack({"w": arrays["w"].astype(">f4")}).digest == pack({"w": model["w"]}).digest


def test_unpack_as_arrays_where_numpy_has_the_dtypes_and_tensors_otherwise() -> None:
    chunks = MemoryChunkStore()
    plain = store(pack({"w": torch.ones(4), "n": torch.tensor([1, 2])}), chunks)
    got = load(chunks, plain, arrays=True)
    assert isinstance(got["w"], np.ndarray) and got["w"].dtype == np.float32 and got["n"].tolist() == [1, 2]
    brain = store(pack({"w": torch.ones(4, dtype=torch.bfloat16)}), chunks)
    assert isinstance(load(chunks, brain, arrays=True)["w"], torch.Tensor)  # numpy has no bfloat16


def test_weighted_mean_gives_the_same_bits_from_arrays_and_from_tensors() -> None:
    g = torch.Generator().manual_seed(11)
    updates = {f"site-{i}": {"model": {"w": torch.randn(64, 33, generator=g), "b": torch.randn(33, generator=g),
                                       "h": torch.randn(9, generator=g).half()}, "n": 17 * i + 3}
               for i in range(1, 5)}
    as_arrays = {s: {"model": {k: v.numpy() for k, v in u["model"].items()}, "n": u["n"]} for s, u in updates.items()}
    mean_t, sites_t, total_t = weighted_mean_tensors(updates)
    mean_a, sites_a, total_a = weighted_mean_tensors(as_arrays)
    assert sites_t == sites_a and total_t == total_a
    assert pack(mean_a).digest == pack(mean_t).digest
    with pytest.raises(Exception, match="site-9's [bhw] is a Tensor, the first site's a ndarray"):
        mixed = dict(as_arrays)
        mixed["site-9"] = {"model": dict(updates["site-1"]["model"]), "n": 1}
        weighted_mean_tensors(mixed)


def test_a_model_built_in_a_child_process_has_the_address_of_one_built_here() -> None:
    here, there = MemoryChunkStore(), MemoryChunkStore()
    kwargs = {"hidden": 32, "depth": 2, "seed": 5}
    direct = make_payload("engine.jobs.mlp:initial_state", kwargs, here, isolate=False)
    child = make_payload("engine.jobs.mlp:initial_state", kwargs, there, isolate=True)
    assert child == direct
    built = load(there, child)
    assert set(built) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert call_on_payload("tests.test_torch_free_server:count_parameters", child, there, isolate=True) == \
        call_on_payload("tests.test_torch_free_server:count_parameters", child, there, isolate=False) == \
        sum(v.numel() for v in built.values())
    with pytest.raises(EngineError, match="failed in its child process"):
        make_payload("engine.jobs.mlp:no_such_function", {}, there, isolate=True)
    assert Manifest.from_bytes(there.get(child)).digest == child
    assert unpack(Manifest.from_bytes(there.get(child)), there.get)["0.bias"].shape == (32,)


def count_parameters(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())


def test_a_prewarmed_child_serves_one_call_with_the_same_result_then_is_gone() -> None:
    from engine.workflows import warm

    here, there = MemoryChunkStore(), MemoryChunkStore()
    kwargs = {"hidden": 16, "depth": 1, "seed": 2}
    warm.prewarm(["engine.jobs.mlp"])
    child = warm.current()
    assert child is not None and child.poll() is None
    direct = make_payload("engine.jobs.mlp:initial_state", kwargs, here, isolate=False)
    assert make_payload("engine.jobs.mlp:initial_state", kwargs, there, isolate=True) == direct
    assert child.returncode == 0 and warm.current() is None  # it served that call and exited
    # a warm child that died waiting is replaced by a fresh one; a failing call still says why
    warm.prewarm(["engine.jobs.mlp"])
    dead = warm.current()
    assert dead is not None
    dead.kill()
    dead.wait()
    assert make_payload("engine.jobs.mlp:initial_state", kwargs, MemoryChunkStore(), isolate=True) == direct
    warm.prewarm(["engine.jobs.mlp"])
    with pytest.raises(EngineError, match="failed in its child process"):
        make_payload("engine.jobs.mlp:no_such_function", {}, there, isolate=True)


def test_the_child_ends_without_finalizing_once_its_payload_is_written(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # finalizing a process that imported torch took 0.4-0.5 s, and the server waits for the
    # child's end before it reads the payload: the child must skip it (an atexit hook shows it ran)
    marker = tmp_path / "finalized"
    (tmp_path / "finalizing_model.py").write_text(
        "import atexit, pathlib, torch\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'ran')\n"
        "def make():\n"
        "    return {'w': torch.arange(6, dtype=torch.float32)}\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")
    chunks = MemoryChunkStore()
    digest = make_payload("finalizing_model:make", {}, chunks, isolate=True)
    assert load(chunks, digest)["w"].tolist() == [0, 1, 2, 3, 4, 5]
    assert not marker.exists()
