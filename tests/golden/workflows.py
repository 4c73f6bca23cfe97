"""Workflows the golden logs were recorded with."""

from __future__ import annotations

import time
from typing import Any

from engine.workflows.builtin import fedavg


def stamped_fedavg(ctl: Any, model: Any, rounds: int = 2, **kw: Any) -> Any:
    """FedAvg, then a publication stamped with the wall clock instead of ``ctl.now()``.

    The bug this golden log keeps: the recorded value differs from what any replay
    computes, so replaying the log must fail with ``NondeterminismError``.
    """
    model = fedavg(ctl, model, rounds=rounds, **kw)
    ctl.publish({"finished_at": time.time()})
    return model
