"""An MLP on synthetic data: the workload of the comparison with NVFlare (``tools/bench/vs_nvflare.py``).

Linear(256→H), ReLU, then D−1 times Linear(H→H), ReLU, then Linear(H→10), float32.
Each round a site runs ``steps`` SGD steps (batch ``batch``, learning rate ``lr``)
from the global weights on synthetic data seeded by site and round, with one torch
thread, and returns its weights and example count. The site builds the network from
the state_dict's shapes, so only the server needs the sizes (``model_args``).
The same functions run inside NVFlare's client script, so both systems do identical
compute.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from engine.client.executor import SiteTask
from engine.errors import TaskError

__all__ = ["CLASSES", "IN_FEATURES", "build", "initial_state", "local_steps", "train", "warm_up"]

IN_FEATURES = 256
CLASSES = 10


class _Uninitialised(nn.Linear):
    """A linear layer whose weights are left as allocated: they are about to be overwritten."""

    def reset_parameters(self) -> None:
        pass


def build(hidden: int = 1024, depth: int = 2, *, init: bool = True) -> nn.Sequential:
    """The MLP with ``depth`` hidden layers of width ``hidden`` (``init=False``: weights not initialised)."""
    linear = nn.Linear if init else _Uninitialised
    layers: list[nn.Module] = [linear(IN_FEATURES, hidden), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [linear(hidden, hidden), nn.ReLU()]
    layers.append(linear(hidden, CLASSES))
    return nn.Sequential(*layers)


def initial_state(hidden: int = 1024, depth: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded starting weights."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build(hidden, depth).state_dict().items()}


def _from_state(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The MLP holding a copy of ``state`` (built without initialising weights it then overwrites)."""
    weights = [k for k in state if k.endswith(".weight")]
    hidden = int(state[weights[0]].shape[0])
    model = build(hidden, len(weights) - 1, init=False)
    model.load_state_dict(state)
    return model


def local_steps(state: dict[str, torch.Tensor], site: str, round: int, steps: int = 20, batch: int = 64,
                lr: float = 0.01) -> dict[str, torch.Tensor]:
    """``steps`` SGD steps from ``state`` on the site's synthetic data for ``round``; the new weights.

    The step is written out — ``param -= lr * grad``, what ``torch.optim.SGD`` does
    without momentum or weight decay, to the bit — because the first use of
    ``torch.optim`` in a process imports torch's compiler stack (``torch._dynamo``):
    1.5 s of CPU per site process here, more than a round of this job.
    """
    torch.set_num_threads(1)
    model = _from_state(state)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(zlib.crc32(f"{round}/{site}".encode()))
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        x = torch.randn(batch, IN_FEATURES, generator=generator)
        y = torch.randint(0, CLASSES, (batch,), generator=generator)
        grads = torch.autograd.grad(loss_fn(model(x), y), params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param.add_(grad, alpha=-lr)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def warm_up() -> None:
    """One tiny training step, so torch's one-time set-up is done before the first task
    (``fedlog client --preload engine.jobs.mlp`` calls this while the site waits)."""
    local_steps(initial_state(hidden=8, depth=1), "warm-up", 0, steps=1, batch=2)


def train(task: SiteTask) -> dict[str, Any]:
    """The sites' executor: ``{"model": new weights, "n": examples seen}``."""
    data = task.data if isinstance(task.data, dict) else {}
    state = data.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TaskError("data.model", "expected the global model's state_dict")
    steps, batch = int(data.get("steps", 20)), int(data.get("batch", 64))
    new = local_steps(state, task.site, int(data.get("round", 0)), steps, batch, float(data.get("lr", 0.01)))
    return {"model": new, "n": steps * batch}
