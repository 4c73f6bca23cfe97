"""Tensors as content-addressed chunks: a payload becomes a manifest plus chunks, and back, bit-exact.

A payload is a state_dict, or any nesting of dicts (string keys) and lists holding
tensors and JSON values (task data and results). ``pack`` replaces each tensor by a
placeholder ``{"$tensor": i}`` in a JSON *skeleton* (its dicts in the payload's key
order, which ``unpack`` gives back) and describes it in the manifest:
its name (the path of keys to it), dtype, shape, byte order, and the blake3
addresses of its chunks. Chunking is tensor-aligned and fixed-size: a tensor's bytes
are cut every ``chunk_size`` bytes (1 MiB by default, overridable per tensor, e.g.
smaller for a large embedding whose updates touch a few rows), so a chunk never
spans two tensors, renaming or inserting a tensor re-sends nothing, and an unchanged
tensor has the same addresses in every round. The manifest is JSON and is itself
content-addressed (``Manifest.digest``).

No pickle anywhere: the bytes are the tensors' own memory. ``pack`` hands out
memoryviews of the tensors (no copy, unless a tensor is not contiguous or not on
the CPU); ``unpack`` allocates each tensor once with its final dtype and shape and
copies the chunks into it. Every torch dtype with a fixed byte size is supported:
bool, (u)int8-64, float16/32/64, bfloat16, the float8 variants, complex32/64/128
and the packed/bit types; quantized tensors are refused. Tensors that share storage
are packed separately (their chunks deduplicate by address).

A manifest that arrives from elsewhere is checked by ``Manifest.from_json`` before
anything is allocated: sizes must agree with dtype and shape, chunk counts with
sizes, addresses must be well-formed; ``ManifestError`` names the bad entry.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from engine.chunks.base import (
    MAX_CHUNK_BYTES,
    Buffer,
    ChunkStore,
    check_digest,
    copy_into,
    hash_bytes,
)
from engine.errors import ChunkError, ManifestError

__all__ = ["DEFAULT_CHUNK_SIZE", "FORMAT", "REF_KEY", "Filling", "Manifest", "Packed", "TensorSpec", "has_tensors",
           "load", "pack", "ref", "ref_digest", "refs_in", "replace_refs", "store", "unpack"]

FORMAT = "fedlog.tensors/1"
DEFAULT_CHUNK_SIZE = 1 << 20
#: the most tensors one manifest may describe, and the deepest shape
MAX_TENSORS = 1_000_000
MAX_DIMS = 64
PLACEHOLDER = "$tensor"

#: dtype name -> bytes per element, for every fixed-size torch dtype. Kept as a table so that
#: reading and checking manifests (the server, chunk routes) does not import torch: torch is
#: imported only by what makes or rebuilds tensors (a process that never does stays small).
_ITEMSIZE = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "complex32": 4, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1, "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
}


@functools.cache
def _dtypes() -> dict[str, Any]:
    """dtype name -> torch dtype, for the dtypes this torch has (imports torch)."""
    import torch

    found = {n: getattr(torch, n) for n in _ITEMSIZE if hasattr(torch, n)}
    for name, dtype in found.items():
        if dtype.itemsize != _ITEMSIZE[name]:  # pragma: no cover - a torch that changed a dtype's size
            raise RuntimeError(f"torch.{name} has {dtype.itemsize} bytes per element, fedlog expects {_ITEMSIZE[name]}")
    return found


@functools.cache
def _names() -> dict[Any, str]:
    return {dtype: name for name, dtype in _dtypes().items()}


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # dtype name -> torch dtype (imports torch on first use)
        return _dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: the dtypes numpy has, by fedlog name: payloads of these can be read and made without torch
_NUMPY = {name: np.dtype(name) for name in ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16",
                                            "uint32", "uint64", "float16", "float32", "float64", "complex64",
                                            "complex128")}
_NUMPY_NAME = {dtype: name for name, dtype in _NUMPY.items()}


def _is_tensor(value: Any) -> bool:
    """A torch tensor? (Without importing torch: if torch is not loaded, nothing is a tensor.)"""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of a manifest."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunk_size: int
    chunks: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        """The spec's JSON object, keys in sorted order (``Manifest.to_bytes`` relies on it)."""
        return {"chunk_size": self.chunk_size, "chunks": list(self.chunks), "dtype": self.dtype,
                "name": self.name, "nbytes": self.nbytes, "shape": list(self.shape)}

    def chunk_lengths(self) -> Iterator[tuple[str, int, int]]:
        """(address, offset, length) of each chunk."""
        for i, digest in enumerate(self.chunks):
            offset = i * self.chunk_size
            yield digest, offset, min(self.chunk_size, self.nbytes - offset)


@dataclass(frozen=True)
class Manifest:
    """The JSON description of a packed payload."""

    skeleton: Any
    tensors: tuple[TensorSpec, ...]
    byte_order: str = "little"

    def as_json(self) -> dict[str, Any]:
        return {"byte_order": self.byte_order, "format": FORMAT, "skeleton": self.skeleton,
                "tensors": [t.as_json() for t in self.tensors]}

    def to_bytes(self) -> bytes:
        """The canonical JSON bytes (what is stored and addressed).

        Every object's keys are sorted except the skeleton's: its dicts keep the payload's
        key order, so a state_dict is unpacked in the order it was packed (the order is
        part of the content, as the tensors' order is). Earlier versions sorted the
        skeleton too, so a manifest they stored reads back in sorted order and is written
        again to the same bytes: re-aggregating an existing log reproduces its hashes.
        """
        return orjson.dumps(self.as_json())  # keys written in sorted order above and in TensorSpec

    @property
    def digest(self) -> str:
        """The manifest's own address: blake3 of its canonical bytes."""
        return hash_bytes(self.to_bytes())

    @property
    def nbytes(self) -> int:
        """Total bytes of the tensors."""
        return sum(t.nbytes for t in self.tensors)

    def chunk_digests(self) -> list[str]:
        """Every chunk address, in order, once each."""
        return list(dict.fromkeys(d for t in self.tensors for d in t.chunks))

    def chunk_sizes(self) -> dict[str, int]:
        """Each distinct chunk's length."""
        return {d: length for t in self.tensors for d, _, length in t.chunk_lengths()}

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse and check manifest bytes (from a store or the network)."""
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ManifestError("(document)", f"not JSON: {exc}") from None
        return cls.from_json(value)

    @classmethod
    def from_json(cls, value: Any) -> Manifest:
        """Check a parsed manifest; ManifestError names the first entry that cannot be right."""
        if not isinstance(value, dict) or value.get("format") != FORMAT:
            raise ManifestError("format", f"expected {FORMAT!r}")
        if value.get("byte_order") != sys.byteorder:
            raise ManifestError("byte_order", f"{value.get('byte_order')!r} is not this machine's ({sys.byteorder})")
        raw_tensors = value.get("tensors")
        if not isinstance(raw_tensors, list) or len(raw_tensors) > MAX_TENSORS:
            raise ManifestError("tensors", f"must be a list of at most {MAX_TENSORS} tensors")
        specs = tuple(_check_tensor(i, t) for i, t in enumerate(raw_tensors))
        skeleton = value.get("skeleton")
        used: list[int] = []
        _check_skeleton(skeleton, len(specs), used, "skeleton")
        if sorted(used) != list(range(len(specs))):
            raise ManifestError("skeleton", f"must refer to each of the {len(specs)} tensors exactly once")
        return cls(skeleton, specs, sys.byteorder)


def _check_tensor(i: int, t: Any) -> TensorSpec:
    where = f"tensors[{i}]"
    if not isinstance(t, dict):
        raise ManifestError(where, "must be an object")
    name, dtype, shape = t.get("name"), t.get("dtype"), t.get("shape")
    if not isinstance(name, str):
        raise ManifestError(f"{where}.name", f"must be a string, got {name!r}")
    if dtype not in _ITEMSIZE:
        raise ManifestError(f"{where}.dtype", f"{dtype!r} is not a supported dtype")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ManifestError(f"{where}.shape", f"must be a list of at most {MAX_DIMS} sizes >= 0, got {shape!r}")
    nbytes = math.prod(shape) * _ITEMSIZE[dtype]
    if t.get("nbytes") != nbytes:
        raise ManifestError(f"{where}.nbytes", f"{t.get('nbytes')!r} does not match {dtype} {shape} ({nbytes} bytes)")
    size = t.get("chunk_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_CHUNK_BYTES:
        raise ManifestError(f"{where}.chunk_size", f"must be 1..{MAX_CHUNK_BYTES}, got {size!r}")
    chunks = t.get("chunks")
    expected = -(-nbytes // size)
    if not isinstance(chunks, list) or len(chunks) != expected:
        raise ManifestError(f"{where}.chunks", f"{nbytes} bytes in chunks of {size} need {expected} chunk(s), "
                                               f"got {len(chunks) if isinstance(chunks, list) else chunks!r}")
    for j, digest in enumerate(chunks):
        try:
            check_digest(digest)
        except ChunkError as exc:
            raise ManifestError(f"{where}.chunks[{j}]", str(exc)) from None
    return TensorSpec(name, dtype, tuple(shape), nbytes, size, tuple(chunks))


def _check_skeleton(node: Any, count: int, used: list[int], path: str) -> None:
    if isinstance(node, dict):
        if PLACEHOLDER in node:
            index = node[PLACEHOLDER]
            if len(node) != 1 or isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
                raise ManifestError(path, f"a tensor placeholder must be {{{PLACEHOLDER!r}: 0..{count - 1}}}")
            used.append(index)
            return
        for key, value in node.items():
            _check_skeleton(value, count, used, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_skeleton(value, count, used, f"{path}[{i}]")


@dataclass
class Packed:
    """A packed payload: its manifest, and each chunk as a view of the tensors' memory."""

    manifest: Manifest
    #: address -> bytes (memoryviews into the tensors; valid while this object lives)
    chunks: dict[str, memoryview]
    #: the arrays the views point into (kept alive with them)
    _keep: list[Any] = field(default_factory=list, repr=False)

    @property
    def digest(self) -> str:
        return self.manifest.digest


def _array_view(a: np.ndarray[Any, Any]) -> tuple[memoryview, Any]:
    native = a.astype(a.dtype.newbyteorder("="), copy=False)
    flat = np.ascontiguousarray(native).reshape(-1).view(np.uint8)
    return flat.data, flat


def _byte_view(t: Any) -> tuple[memoryview, Any]:
    import torch

    flat = t.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().reshape(-1).view(torch.uint8)
    array = flat.numpy()
    return array.data, array


def pack(payload: Any, *, chunk_size: int = DEFAULT_CHUNK_SIZE, chunk_sizes: dict[str, int] | None = None) -> Packed:
    """Describe ``payload``'s tensors in a manifest and cut them into chunks (views, no copies)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_BYTES:
        raise ManifestError("chunk_size", f"must be 1..{MAX_CHUNK_BYTES}, got {chunk_size!r}")
    overrides = dict(chunk_sizes or {})
    specs: list[TensorSpec] = []
    chunks: dict[str, memoryview] = {}
    keep: list[Any] = []

    def visit(node: Any, path: tuple[str, ...]) -> Any:
        is_array = isinstance(node, np.ndarray)
        if is_array or _is_tensor(node):
            name = "/".join(path)
            dtype = _NUMPY_NAME.get(node.dtype.newbyteorder("=")) if is_array else _names().get(node.dtype)
            if dtype is None:
                raise ManifestError(name or "(root)", f"dtype {node.dtype} cannot be packed (quantized or sub-byte)")
            size = overrides.pop(name, chunk_size)
            view, array = _array_view(node) if is_array else _byte_view(node)
            keep.append(array)
            digests = []
            for offset in range(0, len(view), size):
                piece = view[offset:offset + size]
                digest = hash_bytes(piece)
                chunks.setdefault(digest, piece)
                digests.append(digest)
            specs.append(TensorSpec(name, dtype, tuple(node.shape), len(view), size, tuple(digests)))
            return {PLACEHOLDER: len(specs) - 1}
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if not isinstance(key, str):
                    raise ManifestError("/".join(path) or "(root)", f"keys must be strings, got {key!r}")
                if key == PLACEHOLDER:
                    raise ManifestError("/".join(path) or "(root)", f"the key {PLACEHOLDER!r} is reserved")
                out[key] = visit(value, (*path, key))
            return out
        if isinstance(node, list | tuple):
            return [visit(value, (*path, str(i))) for i, value in enumerate(node)]
        return node

    skeleton = visit(payload, ())
    if overrides:
        raise ManifestError("chunk_sizes", f"no tensor named {sorted(overrides)[0]!r}")
    try:
        skeleton = orjson.loads(orjson.dumps(skeleton))
    except TypeError as exc:
        raise ManifestError("skeleton", f"values other than tensors must be JSON: {exc}") from None
    return Packed(Manifest(skeleton, tuple(specs), sys.byteorder), chunks, keep)


def _empty_tensor(i: int, spec: TensorSpec) -> tuple[Any, np.ndarray[Any, Any]]:
    import torch

    dtypes = _dtypes()
    if spec.dtype not in dtypes:
        raise ManifestError(f"tensors[{i}].dtype", f"{spec.dtype!r} is not a dtype of this torch ({torch.__version__})")
    with warnings.catch_warnings():  # complex32 allocations warn that the dtype is experimental
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.empty(spec.shape, dtype=dtypes[spec.dtype])
    return tensor, tensor.reshape(-1).view(torch.uint8).numpy()


def _empty_array(spec: TensorSpec) -> tuple[Any, np.ndarray[Any, Any]]:
    array = np.empty(spec.shape, dtype=_NUMPY[spec.dtype])
    return array, array.reshape(-1).view(np.uint8)


def _copy_chunk(get_chunk: Callable[[str], bytes | memoryview], digest: str, target: Any) -> int:
    return copy_into(target, get_chunk(digest))


class Filling:
    """A payload's tensors, allocated once from its manifest and filled chunk by chunk.

    ``fill`` takes a chunk's verified bytes as they arrive (a receiver copies them from the
    answer in hand, so they need not be read back from its store); ``finish`` reads the
    chunks not filled that way (``read_into``: a store's, verified, straight into the
    tensor's memory) and returns the payload. ``arrays``: numpy arrays instead of torch
    tensors when numpy has every dtype of the payload (the server aggregates this way
    without importing torch); otherwise tensors. The bytes, and so the address of a
    payload packed from them again, are the same.
    """

    def __init__(self, manifest: Manifest, *, arrays: bool = False) -> None:
        self.manifest = manifest
        as_arrays = arrays and all(spec.dtype in _NUMPY for spec in manifest.tensors)
        self.tensors: list[Any] = []
        #: digest -> the places its bytes go: (tensor index, the target bytes)
        self._targets: dict[str, list[tuple[int, Any]]] = {}
        for i, spec in enumerate(manifest.tensors):
            tensor, target = _empty_array(spec) if as_arrays else _empty_tensor(i, spec)
            self.tensors.append(tensor)
            if spec.nbytes:
                for digest, offset, length in spec.chunk_lengths():
                    self._targets.setdefault(digest, []).append((i, target[offset:offset + length]))
        self._filled: set[str] = set()

    def fill(self, digest: str, data: Buffer) -> None:
        """Copy a chunk's (verified) bytes to every place the manifest puts them."""
        for i, target in self._targets.get(digest, ()):
            self._check(i, digest, copy_into(target, data), len(target))
        self._filled.add(digest)

    def finish(self, read_into: Callable[[str, Any], int]) -> Any:
        """Read the chunks ``fill`` was not given; return the payload."""
        for digest, targets in self._targets.items():
            if digest not in self._filled:
                for i, target in targets:
                    self._check(i, digest, read_into(digest, target), len(target))

        def build(node: Any) -> Any:
            if isinstance(node, dict):
                if PLACEHOLDER in node:
                    return self.tensors[node[PLACEHOLDER]]
                return {k: build(v) for k, v in node.items()}
            if isinstance(node, list):
                return [build(v) for v in node]
            return node

        return build(self.manifest.skeleton)

    @staticmethod
    def _check(i: int, digest: str, size: int, length: int) -> None:
        if size != length:
            raise ManifestError(f"tensors[{i}].chunks", f"chunk {digest} has {size} bytes, the manifest says {length}")


def unpack(manifest: Manifest, get_chunk: Callable[[str], bytes | memoryview] | None = None, *,
           arrays: bool = False, read_into: Callable[[str, Any], int] | None = None) -> Any:
    """Rebuild the payload: allocate each tensor once, fill it chunk by chunk (each checked for length).

    The chunks come from ``read_into(digest, target)`` (a store's ``read_into``: verified,
    straight into the tensor's memory) or else from ``get_chunk(digest)`` (their bytes,
    copied in). ``arrays``: as for ``Filling``.
    """
    if read_into is None:
        if get_chunk is None:
            raise TypeError("unpack needs get_chunk or read_into")
        read_into = functools.partial(_copy_chunk, get_chunk)
    return Filling(manifest, arrays=arrays).finish(read_into)


def store(packed: Packed, chunk_store: ChunkStore) -> str:
    """Put the manifest and the chunks the store lacks; sync; return the manifest's address."""
    manifest_bytes = packed.manifest.to_bytes()
    digest = hash_bytes(manifest_bytes)
    for missing in chunk_store.missing(packed.chunks):
        chunk_store.put(missing, packed.chunks[missing])
    chunk_store.put(digest, manifest_bytes)
    chunk_store.sync()
    return digest


def load(chunk_store: ChunkStore, manifest_digest: str, *, arrays: bool = False) -> Any:
    """The payload whose manifest is stored under ``manifest_digest`` (chunks verified on read)."""
    return unpack(Manifest.from_bytes(chunk_store.get(manifest_digest)), arrays=arrays,
                  read_into=chunk_store.read_into)


# -- references: how JSON (task data, results, events) points at a packed payload ---------------

#: the key of a reference object: ``{"$tensors": "<manifest address>"}``
REF_KEY = "$tensors"


def ref(manifest_digest: str) -> dict[str, str]:
    """The JSON that stands for a stored payload in task data, results and events."""
    return {REF_KEY: check_digest(manifest_digest)}


def ref_digest(value: Any) -> str | None:
    """The manifest address if ``value`` is a reference, else None."""
    if isinstance(value, dict) and len(value) == 1 and isinstance(value.get(REF_KEY), str):
        return str(value[REF_KEY])
    return None


def refs_in(value: Any) -> list[str]:
    """Every manifest address referenced anywhere in a JSON value (in order, once each)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        digest = ref_digest(node)
        if digest is not None:
            found.append(digest)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(value)
    return list(dict.fromkeys(found))


def replace_refs(value: Any, fn: Callable[[str], Any]) -> Any:
    """``value`` with each reference replaced by ``fn(manifest address)``."""
    digest = ref_digest(value)
    if digest is not None:
        return fn(digest)
    if isinstance(value, dict):
        return {k: replace_refs(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_refs(v, fn) for v in value]
    return value


def has_tensors(value: Any) -> bool:
    """True if ``value`` holds a tensor anywhere (dicts and lists are searched)."""
    if isinstance(value, np.ndarray) or _is_tensor(value):
        return True
    if isinstance(value, dict):
        return any(has_tensors(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(has_tensors(v) for v in value)
    return False
