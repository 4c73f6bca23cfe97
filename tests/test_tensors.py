"""Tensors as manifest + chunks: bit-exact for every dtype and layout, tensor-aligned, checked on the way in."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from engine.chunks import LocalChunkStore, MemoryChunkStore, hash_bytes
from engine.errors import ChunkIntegrityError, ManifestError
from engine.tensors import DTYPES, Manifest, load, pack, store, unpack


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` filled with random bit patterns (NaNs and all)."""
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = torch.empty(shape, dtype=dtype)
    flat = out.reshape(-1).view(torch.uint8)
    flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8, generator=g))
    if dtype is torch.bool:
        flat.copy_(flat % 2)
    return out


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def roundtrip(payload: Any, **kw: Any) -> Any:
    packed = pack(payload, **kw)
    manifest = Manifest.from_bytes(packed.manifest.to_bytes())  # as it would arrive
    return unpack(manifest, lambda d: bytes(packed.chunks[d]))


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_bit_exact(name: str) -> None:
    dtype = DTYPES[name]
    payload = {"t": random_tensor(dtype, (5, 7), seed=len(name)), "scalar": random_tensor(dtype, ()),
               "empty": random_tensor(dtype, (0, 3))}
    assert same(payload, roundtrip(payload, chunk_size=16))


def test_layouts_non_contiguous_zero_size_scalars_shared_storage() -> None:
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    payload = {
        "transposed": base.t(), "strided": base[::2, 1::3], "scalar": torch.tensor(3.5),
        "empty": torch.empty(0), "view_a": base[1], "view_b": base[1],  # two tensors, one storage
        "grad": torch.ones(3, requires_grad=True),
    }
    out = roundtrip(payload, chunk_size=8)
    assert same(payload, out)
    assert not out["transposed"].requires_grad and out["transposed"].is_contiguous()
    out["view_a"][0] = -1  # unpacked tensors own their memory
    assert out["view_b"][0] == 8


def test_nested_payloads_keep_their_json() -> None:
    payload = {"round": 3, "model": {"fc.weight": torch.randn(4, 4), "fc.bias": torch.randn(4)},
               "history": [1.5, {"note": "x", "t": torch.tensor([1, 2], dtype=torch.int64)}], "flag": None}
    packed = pack(payload)
    assert [t.name for t in packed.manifest.tensors] == ["model/fc.weight", "model/fc.bias", "history/1/t"]
    assert packed.manifest.skeleton["round"] == 3 and packed.manifest.skeleton["history"][0] == 1.5
    assert same(payload, roundtrip(payload))


def test_dicts_come_back_in_the_order_they_were_packed(tmp_path: Path) -> None:
    # a torch state_dict's order (layer order) is not its keys' sorted order
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).state_dict()
    payload = {"n": 64, "model": model, "meta": {"z": 1, "a": [{"y": 2, "b": 3}]}}
    assert list(model) != sorted(model)
    with LocalChunkStore(tmp_path / "chunks") as chunks:
        out = load(chunks, store(pack(payload), chunks))
    assert list(out) == ["n", "model", "meta"]
    assert list(out["model"]) == list(model)
    assert list(out["meta"]) == ["z", "a"] and list(out["meta"]["a"][0]) == ["y", "b"]
    # the order is content: the same tensors in another order are another manifest
    reordered = dict(sorted(model.items()))
    assert pack(reordered).digest != pack(model).digest
    assert list(unpack(pack(reordered).manifest, pack(reordered).chunks.__getitem__)) == sorted(model)


def test_a_sorted_skeleton_keeps_the_bytes_and_addresses_of_earlier_versions() -> None:
    # earlier versions wrote every object with sorted keys (the skeleton's too); a payload
    # whose dicts are sorted, and every manifest already stored, must keep its bytes and
    # address, or re-aggregating an existing log would not reproduce its recorded hashes
    payload = {"a": {"bias": torch.ones(2), "weight": torch.zeros(2, 2)}, "n": 3, "z": [{"k": 1, "t": torch.ones(1)}]}
    manifest = pack(payload, chunk_size=4).manifest
    earlier = orjson.dumps(manifest.as_json(), option=orjson.OPT_SORT_KEYS)
    assert manifest.to_bytes() == earlier
    assert Manifest.from_bytes(earlier).digest == hash_bytes(earlier)


def test_chunks_are_tensor_aligned_fixed_size_and_views_of_the_tensors() -> None:
    a, b = torch.arange(10, dtype=torch.int32), torch.arange(3, dtype=torch.int64)
    packed = pack({"a": a, "b": b}, chunk_size=16)
    ta, tb = packed.manifest.tensors
    assert [length for _, _, length in ta.chunk_lengths()] == [16, 16, 8]  # 40 bytes, never mixed with b's
    assert [length for _, _, length in tb.chunk_lengths()] == [16, 8]
    view = packed.chunks[ta.chunks[0]]
    assert np.shares_memory(np.asarray(view), a.numpy())  # no copy of a contiguous CPU tensor
    with pytest.raises(ManifestError, match="no tensor named 'c'"):
        pack({"a": a}, chunk_sizes={"c": 4})
    emb = pack({"emb": torch.zeros(100, 8), "w": torch.zeros(100, 8)}, chunk_size=1024, chunk_sizes={"emb": 64})
    assert [t.chunk_size for t in emb.manifest.tensors] == [64, 1024]


def test_renaming_or_inserting_tensors_resends_nothing_old(tmp_path: Path) -> None:
    model = {f"layer{i}.weight": torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)}
    chunks = MemoryChunkStore()
    store(pack(model, chunk_size=4096), chunks)
    renamed = {k.replace("layer", "block"): v for k, v in model.items()}
    inserted = {"embed": torch.randn(10, 3), **model}
    assert chunks.missing(pack(renamed, chunk_size=4096).chunks) == []
    new = pack(inserted, chunk_size=4096)
    assert chunks.missing(new.chunks) == list(new.manifest.tensors[0].chunks)


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_store_and_load_through_a_chunk_store(kind: str, tmp_path: Path) -> None:
    chunks = MemoryChunkStore() if kind == "memory" else LocalChunkStore(tmp_path / "c")
    payload = {"w": torch.randn(300, 300), "b": torch.randn(300).to(torch.bfloat16), "n": 12}
    digest = store(pack(payload, chunk_size=65536), chunks)
    assert same(payload, load(chunks, digest))
    assert store(pack(copy.deepcopy(payload), chunk_size=65536), chunks) == digest  # same content, same address
    chunks.close()


def test_a_corrupt_chunk_is_never_used() -> None:
    chunks = MemoryChunkStore()
    packed = pack({"w": torch.randn(100)}, chunk_size=64)
    digest = store(packed, chunks)
    victim = packed.manifest.tensors[0].chunks[1]
    chunks.corrupt(victim, b"\0" * 64)
    with pytest.raises(ChunkIntegrityError, match=victim):
        load(chunks, digest)


def test_a_corrupt_chunk_on_disk_is_never_used_and_is_dropped(tmp_path: Path) -> None:
    chunks = LocalChunkStore(tmp_path / "c")
    packed = pack({"w": torch.randn(100)}, chunk_size=64)
    digest = store(packed, chunks)
    victim = packed.manifest.tensors[0].chunks[2]
    stat = chunks.stat(victim)
    assert stat is not None and stat.pack is not None
    with open(chunks.packs_dir / stat.pack, "r+b") as fh:
        fh.seek(stat.offset)
        fh.write(b"\x00\x01")
    with pytest.raises(ChunkIntegrityError, match=victim):
        load(chunks, digest)
    assert chunks.missing(packed.manifest.chunk_digests()) == [victim]  # fetched again, not used
    chunks.close()


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_a_chunk_of_another_length_than_the_manifest_says_is_refused(kind: str, tmp_path: Path) -> None:
    chunks = MemoryChunkStore() if kind == "memory" else LocalChunkStore(tmp_path / "c")
    packed = pack({"w": torch.randn(100)}, chunk_size=64)  # 400 bytes: six chunks of 64, one of 16
    store(packed, chunks)
    doc = packed.manifest.as_json()
    doc["tensors"][0]["chunks"][-1] = doc["tensors"][0]["chunks"][0]  # a held chunk of 64 bytes
    lying = Manifest.from_json(doc)
    with pytest.raises(ManifestError, match="has 64 bytes, the manifest says 16"):
        unpack(lying, read_into=chunks.read_into)
    with pytest.raises(ManifestError, match="has 64 bytes, the manifest says 16"):
        unpack(lying, chunks.get)
    chunks.close()


def manifest_json(**tensor_changes: Any) -> dict[str, Any]:
    doc = pack({"w": torch.zeros(4, 4)}, chunk_size=32).manifest.as_json()
    doc["tensors"][0].update(tensor_changes)
    return doc


@pytest.mark.parametrize(("changes", "path"), [
    ({"nbytes": 8}, "tensors[0].nbytes"),
    ({"shape": [4, -1]}, "tensors[0].shape"),
    ({"dtype": "float128"}, "tensors[0].dtype"),
    ({"chunk_size": 0}, "tensors[0].chunk_size"),
    ({"chunks": ["0" * 64]}, "tensors[0].chunks"),
    ({"chunks": ["0" * 64, "XYZ"]}, "tensors[0].chunks[1]"),
    ({"name": 7}, "tensors[0].name"),
])
def test_lying_or_malformed_manifests_are_refused(changes: dict[str, Any], path: str) -> None:
    with pytest.raises(ManifestError) as err:
        Manifest.from_json(manifest_json(**changes))
    assert err.value.path == path


def test_skeleton_and_document_errors() -> None:
    doc = manifest_json()
    doc["skeleton"] = {"a": {"$tensor": 0}, "b": {"$tensor": 0}}
    with pytest.raises(ManifestError, match="exactly once"):
        Manifest.from_json(doc)
    doc["skeleton"] = {"a": {"$tensor": 5}}
    with pytest.raises(ManifestError, match="placeholder"):
        Manifest.from_json(doc)
    with pytest.raises(ManifestError, match="format"):
        Manifest.from_json({"format": "pickle"})
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.from_bytes(b"\x80\x04")
    packed = pack({"w": torch.zeros(8)}, chunk_size=16)
    short = {d: bytes(v)[:-1] for d, v in packed.chunks.items()}
    with pytest.raises(ManifestError, match="bytes, the manifest says"):
        unpack(packed.manifest, short.__getitem__)


def test_what_cannot_be_packed() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated in torch itself
        quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(ManifestError, match="cannot be packed"):
        pack({"q": quantized})
    with pytest.raises(ManifestError, match="reserved"):
        pack({"$tensor": 1})
    with pytest.raises(ManifestError, match="must be JSON"):
        pack({"w": torch.zeros(1), "when": object()})
    with pytest.raises(ManifestError, match="keys must be strings"):
        pack({1: torch.zeros(1)})
    empty = pack({})
    assert empty.manifest.nbytes == 0 and empty.manifest.digest == hash_bytes(empty.manifest.to_bytes())
