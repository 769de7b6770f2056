"""The baseline: the PyTorch MNIST tutorial's training loop, as the tutorial writes it.

Every image goes through ``ToTensor()`` + ``Normalize`` in a DataLoader on every epoch, the
loss is read with ``loss.item()`` after every step, and accuracy is counted batch by batch.
Only the model (the tutorial's SimpleMLP, shared with the service) and the device argument
are not copied from it. Kept here, unchanged, as the figure every user knows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from service.ml import MNIST_MEAN, MNIST_STD, SimpleMLP
from service.schemas import JobCreate

TEST_BATCH = 1000


@dataclass(frozen=True)
class Trained:
    """One training run: its wall time, final test accuracy and the losses it read."""

    seconds: float
    accuracy: float
    losses: list[float]


@dataclass(frozen=True)
class TutorialData:
    """The tutorial's two datasets, built once (torchvision reads the files on construction)."""

    train: datasets.MNIST
    test: datasets.MNIST


def tutorial_data(root: Path) -> TutorialData:
    """MNIST with the tutorial's per-image transform."""
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]
    )
    return TutorialData(
        train=datasets.MNIST(root=str(root), train=True, download=False, transform=transform),
        test=datasets.MNIST(root=str(root), train=False, download=False, transform=transform),
    )


def tutorial_train(
    data: TutorialData, params: JobCreate, *, seed: int = 0, device: torch.device | None = None
) -> Trained:
    """Train and validate as the tutorial does; the time covers the epochs, not file reading."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    train_loader = DataLoader(
        Subset(data.train, range(params.trainset_size)), batch_size=params.batch_size, shuffle=True
    )
    test_loader = DataLoader(Subset(data.test, range(params.testset_size)), batch_size=TEST_BATCH)
    started = time.perf_counter()
    model = SimpleMLP().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=params.learning_rate)
    losses: list[float] = []
    accuracy = 0.0
    for _epoch in range(params.epochs):
        model.train()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                images, labels = images.to(device), labels.to(device)
                predicted = model(images).argmax(dim=1)
                total += labels.size(0)
                correct += int((predicted == labels).sum().item())
        accuracy = correct / total
    return Trained(time.perf_counter() - started, accuracy, losses)
