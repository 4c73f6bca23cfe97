"""FedAvg on PyTorch: a small CNN learns scikit-learn's handwritten digits, split across sites.

The digits (1797 images of 8x8 pixels, shipped with scikit-learn) are split once:
every fifth image is the held-out test set, the rest are training images, and
training image ``i`` belongs to the site at position ``i % n`` of the sorted site
list. Each round a site starts from the global weights, runs ``epochs`` of SGD over
its shard (one torch thread, batch order seeded by round and site, so a rerun is bit
for bit the same) and returns its weights and example count; the built-in
``fedavg_torch`` workflow averages them.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import torch
from torch import nn

from engine.client.executor import SiteTask
from engine.errors import TaskError

__all__ = ["centralized_accuracy", "evaluate", "initial_state", "make_model", "swarm_learn", "train", "warm_up"]


def make_model() -> nn.Module:
    """Conv(1→8) → pool → Conv(8→16) → pool → Linear(64→10): 2.2 k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
    )


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's starting weights (seeded)."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in make_model().state_dict().items()}


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return x, y


def split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test): every fifth image is held out."""
    x, y = _digits()
    test = torch.arange(len(y)) % 5 == 0
    return (x[~test], y[~test]), (x[test], y[test])


def shard(site: str, sites: list[str] | tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images of ``site``."""
    ordered = sorted(sites) or [site]
    if site not in ordered:
        raise TaskError("sites", f"{site!r} is not one of the job's sites {ordered}")
    (x, y), _ = split()
    mine = torch.arange(len(y)) % len(ordered) == ordered.index(site)
    return x[mine], y[mine]


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch: int,
         seed: int) -> float:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    loss = torch.tensor(0.0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return float(loss.detach())


def warm_up() -> None:
    """Load the digits and take one training step before the first task (``--preload``)."""
    torch.set_num_threads(1)
    model = make_model()
    x, y = split()[0]
    _fit(model, x[:8], y[:8], epochs=1, lr=0.01, batch=8, seed=0)


def train(task: SiteTask) -> dict[str, Any]:
    """The sites' executor: local epochs from the global model; returns ``{"model", "n", "loss"}``."""
    data = task.data if isinstance(task.data, dict) else {}
    state = data.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TaskError("data.model", "expected the global model's state_dict")
    model = make_model()
    model.load_state_dict(state)
    x, y = shard(task.site, list(data.get("sites") or task.job_sites))
    seed = zlib.crc32(f"{data.get('round', 0)}/{task.site}".encode())
    loss = _fit(model, x, y, epochs=int(data.get("epochs", 2)), lr=float(data.get("lr", 0.05)),
                batch=int(data.get("batch", 32)), seed=seed)
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "n": len(y), "loss": loss}


def swarm_learn(task: SiteTask) -> dict[str, Any]:
    """The swarm learner: validate the received global model on this site's held-out images, then train.

    The metric (accuracy of the model the round started from, as the reference's
    swarm learners report it) is what the aggregator's best-model choice compares.
    """
    data = task.data if isinstance(task.data, dict) else {}
    state = data.get("model")
    if not isinstance(state, dict):
        raise TaskError("data.model", "expected the global model's state_dict")
    sites = sorted(data.get("sites") or task.job_sites) or [task.site]
    _, (x, y) = split()
    mine = torch.arange(len(y)) % len(sites) == (sites.index(task.site) if task.site in sites else 0)
    model = make_model()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        metric = float((model(x[mine]).argmax(dim=1) == y[mine]).float().mean())
    return {**train(task), "metric": metric}


def evaluate(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Accuracy of ``state`` on the held-out images."""
    model = make_model()
    model.load_state_dict(state)
    model.eval()
    _, (x, y) = split()
    with torch.no_grad():
        correct = int((model(x).argmax(dim=1) == y).sum())
    return {"accuracy": correct / len(y), "test_images": len(y)}


def centralized_accuracy(rounds: int, epochs: int = 2, lr: float = 0.05, batch: int = 32, seed: int = 0) -> float:
    """The same model trained in one place on all training images for ``rounds * epochs`` epochs."""
    model = make_model()
    model.load_state_dict(initial_state(seed))
    (x, y), _ = split()
    _fit(model, x, y, epochs=rounds * epochs, lr=lr, batch=batch, seed=seed)
    return float(evaluate(model.state_dict())["accuracy"])
