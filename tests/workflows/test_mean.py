"""The FedAvg mean: computed block by block, it gives the bits of the whole-array formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.workflows import builtin
from engine.workflows.builtin import weighted_mean_tensors


def whole_array_mean(updates: dict[str, dict]) -> dict[str, np.ndarray]:
    """The formula the blocks must reproduce: widen, scale, add in site order, divide, round once."""
    sites = sorted(updates)
    total = 0.0
    for s in sites:
        total += float(updates[s]["n"])
    out = {}
    for key, like in updates[sites[0]]["model"].items():
        acc = np.zeros(like.shape, dtype=np.float64)
        for s in sites:
            acc += float(updates[s]["n"]) * np.asarray(updates[s]["model"][key]).astype(np.float64)
        out[key] = (acc / total).astype(like.dtype)
    return out


def make_updates(sizes: dict[str, tuple[tuple[int, ...], str]], weights: list[float], seed: int = 3
                 ) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    updates = {}
    for i, n in enumerate(weights):
        model = {}
        for key, (shape, dtype) in sizes.items():
            values = np.asarray(rng.standard_normal(shape) * 100)
            model[key] = np.asarray(values > 0) if dtype == "bool" else values.astype(dtype)
        updates[f"site-{i + 1}"] = {"model": model, "n": n}
    return updates


SIZES = {
    "big": ((3 * builtin._BLOCK + 17,), "float32"),  # several blocks and a ragged last one
    "matrix": ((301, 257), "float32"),
    "double": ((builtin._BLOCK + 1,), "float64"),
    "half": ((5000,), "float16"),
    "count": ((7,), "int64"),
    "mask": ((33,), "bool"),
    "scalar": ((), "float32"),
    "empty": ((0, 4), "float32"),
}


@pytest.mark.parametrize("weights", [[1280, 1280, 1280, 1280], [3, 1.5, 1e6, 7.25]])
def test_the_blocked_mean_has_the_bits_of_the_whole_array_formula(weights: list[float]) -> None:
    updates = make_updates(SIZES, weights)
    expected = whole_array_mean(updates)
    mean, sites, total = weighted_mean_tensors(updates)
    assert sites == sorted(updates) and total == sum(weights)
    for key, want in expected.items():
        assert mean[key].dtype == want.dtype and mean[key].shape == want.shape, key
        assert mean[key].tobytes() == want.tobytes(), key


def test_tensors_give_the_bits_of_arrays_and_dtypes_numpy_lacks_are_averaged_in_torch() -> None:
    updates = make_updates(SIZES, [2, 5, 11])
    as_tensors = {s: {"model": {k: torch.from_numpy(np.array(v)) for k, v in u["model"].items()}, "n": u["n"]}
                  for s, u in updates.items()}
    from_arrays, _, _ = weighted_mean_tensors(updates)
    from_tensors, _, _ = weighted_mean_tensors(as_tensors)
    for key, array in from_arrays.items():
        assert isinstance(from_tensors[key], torch.Tensor)
        assert from_tensors[key].numpy().tobytes() == array.tobytes(), key
    g = torch.Generator().manual_seed(5)
    brain = {f"site-{i}": {"model": {"w": torch.randn(builtin._BLOCK + 3, generator=g).bfloat16()}, "n": i}
             for i in (1, 2, 3)}
    mean, _, total = weighted_mean_tensors(brain)
    acc = torch.zeros(builtin._BLOCK + 3, dtype=torch.float64)
    for i in (1, 2, 3):
        acc += float(i) * brain[f"site-{i}"]["model"]["w"].double()
    assert mean["w"].dtype == torch.bfloat16 and torch.equal(mean["w"], (acc / total).bfloat16())
