"""A small FedAvg job: linear regression on scikit-learn's diabetes data, trained per site.

Each site takes its shard of the rows (row i belongs to site ``i % n`` in sorted site
order), runs a few epochs of full-batch gradient descent from the global model and
returns ``{"model", "n"}`` for the built-in ``fedavg`` workflow. The arithmetic is
float64 in a fixed order, so every run of the job computes the same model bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.errors import TaskError

if TYPE_CHECKING:
    from engine.client.executor import SiteTask

__all__ = ["initial_model", "train"]

#: number of features of the diabetes data set
FEATURES = 10


def initial_model() -> dict[str, Any]:
    """The zero model: ``{"w": [0.0] * 10, "b": 0.0}``."""
    return {"w": [0.0] * FEATURES, "b": 0.0}


def _shard(site: str, sites: tuple[str, ...]) -> tuple[Any, Any]:
    # numpy is imported where it is used: the job catalog imports this module for its
    # starting model, and the command line that reads the catalog needs no numpy
    import numpy as np
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x, y = np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=np.float64)
    ordered = sorted(sites) or [site]
    if site not in ordered:
        raise TaskError("job_sites", f"{site!r} is not one of the job's sites {ordered}")
    rows = np.arange(len(y)) % len(ordered) == ordered.index(site)
    return x[rows], y[rows]


def train(task: SiteTask) -> dict[str, Any]:
    """Local epochs of gradient descent from the global model in ``task.data["model"]``."""
    data = task.data if isinstance(task.data, dict) else {}
    model = data.get("model")
    if not isinstance(model, dict) or len(model.get("w", [])) != FEATURES:
        raise TaskError("data.model", f"expected {{'w': [{FEATURES} numbers], 'b': number}}, got {model!r}")
    epochs = int(task.props.get("epochs") or data.get("epochs") or 20)
    lr = float(task.props.get("lr") or data.get("lr") or 0.5)
    import numpy as np

    x, y = _shard(task.site, task.job_sites)
    w = np.asarray(model["w"], dtype=np.float64)
    b = float(model["b"])
    for _ in range(epochs):
        err = x @ w + b - y
        w = w - lr * (x.T @ err) / len(y)
        b = b - lr * float(err.mean())
    return {"model": {"w": [float(v) for v in w], "b": b}, "n": len(y)}
