"""FedAvg on PyTorch: the federated CNN gets within 2 points of the same model trained centrally,
and the torch weighted mean is exact and order-independent."""

from __future__ import annotations

import torch

from engine.client.executor import SiteTask
from engine.jobs import cnn
from engine.jobs.catalog import CATALOG
from engine.workflows.builtin import weighted_mean_tensors

SITES = ("site-1", "site-2", "site-3")


def test_federated_accuracy_is_within_two_points_of_centralized() -> None:
    args = CATALOG["cnn"]["args"]
    rounds, epochs, lr = args["rounds"], args["epochs"], args["lr"]
    model = cnn.initial_state()
    for r in range(rounds):
        updates = {s: cnn.train(SiteTask("j", "j.t", f"j.t/{s}", "train", {"round": r, "model": model,
                                                                          "epochs": epochs, "lr": lr}, {}, s, SITES))
                   for s in SITES}
        model, sites, total = weighted_mean_tensors(updates)
        assert sites == list(SITES) and total == len(cnn.split()[0][1])
    federated = cnn.evaluate(model)["accuracy"]
    central = cnn.centralized_accuracy(rounds, epochs, lr)
    assert central > 0.95
    assert abs(federated - central) <= 0.02, (federated, central)


def test_weighted_mean_of_state_dicts() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(1.0)}
    b = {"w": torch.tensor([4.0, 5.0]), "b": torch.tensor(4.0)}
    mean, sites, total = weighted_mean_tensors({"y": {"model": b, "n": 2}, "x": {"model": a, "n": 1}})
    assert sites == ["x", "y"] and total == 3.0
    assert torch.equal(mean["w"], torch.tensor([3.0, 4.0])) and torch.equal(mean["b"], torch.tensor(3.0))
    assert mean["w"].dtype == torch.float32
