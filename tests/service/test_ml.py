"""The model, the fast normalisation, devices and checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.datasets import MNIST

from service.ml import (
    MNIST_MEAN,
    MNIST_STD,
    SimpleMLP,
    load_model,
    normalization_table,
    normalize_uint8,
    resolve_device,
    save_checkpoint,
    to_host,
)
from tests.support import REPO_ROOT


class Point(NamedTuple):
    """A named tuple inside a state, as some optimizers keep."""

    x: torch.Tensor
    n: int


TUTORIAL_TRANSFORM = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]
)


def assert_matches_tutorial_transform(root: Path, *, train: bool, count: int) -> None:
    reference = MNIST(str(root), train=train, download=False, transform=TUTORIAL_TRANSFORM)
    expected = torch.stack([reference[i][0] for i in range(count)])
    fast = normalize_uint8(reference.data[:count])
    torch.testing.assert_close(fast, expected)
    assert torch.equal(fast, expected)  # not only close: bit for bit


def test_the_normalisation_table_gives_the_tutorial_value_of_every_pixel() -> None:
    every_value = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    expected = TUTORIAL_TRANSFORM(Image.fromarray(every_value.numpy(), mode="L"))
    table = torch.tensor(normalization_table())
    assert torch.equal(table[every_value.long()].unsqueeze(0), expected)


def test_simple_mlp_is_the_tutorials_model() -> None:
    layers = list(SimpleMLP().net)
    assert [type(m) for m in layers] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    first, last = layers[1], layers[3]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    assert (first.in_features, first.out_features) == (784, 100)
    assert (last.in_features, last.out_features) == (100, 10)
    assert SimpleMLP()(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_fast_path_equals_the_tutorial_transform_on_generated_images(small_mnist: Path) -> None:
    assert_matches_tutorial_transform(small_mnist, train=True, count=640)


@pytest.mark.real_data
@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_fast_path_equals_the_tutorial_transform_on_real_mnist(
    real_mnist: Path, train: bool
) -> None:
    assert_matches_tutorial_transform(real_mnist, train=train, count=3000)


def test_checkpoints_round_trip_without_unpickling_code(tmp_path: Path) -> None:
    model = SimpleMLP()
    path = tmp_path / "ckpt" / "job.pt"
    save_checkpoint(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["job.pt"]  # no temporary left over
    loaded = load_model(path)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))
    assert not loaded.training


def test_to_host_keeps_the_structure_and_every_value() -> None:
    model = SimpleMLP()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    state: dict[str, Any] = {
        "epoch": 2,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "pair": (torch.ones(2), [torch.zeros(1)]),
        "point": Point(torch.ones(1), 3),
    }
    host = to_host(state)
    assert type(host["pair"]) is tuple and type(host["pair"][1]) is list
    assert host["point"] == Point(host["point"].x, 3) and isinstance(host["point"], Point)
    assert type(host["optimizer"]["param_groups"][0]["betas"]) is tuple
    torch.testing.assert_close(host, state, rtol=0, atol=0)
    # What a resumed run loads: the copies restore a fresh model and optimizer exactly.
    restored = SimpleMLP()
    restored.load_state_dict(host["model"])
    fresh_optimizer = torch.optim.Adam(restored.parameters())
    fresh_optimizer.load_state_dict(host["optimizer"])
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    for mine, theirs in zip(restored.parameters(), model.parameters(), strict=True):
        for key, value in optimizer.state[theirs].items():
            assert torch.equal(fresh_optimizer.state[mine][key], value)


def test_a_checkpoint_with_code_in_it_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"net.1.weight": torch.zeros(1), "hook": print}, path)
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported global"):
        load_model(path)


def test_an_interrupted_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "job.pt"
    first = SimpleMLP()
    save_checkpoint(first, path)

    def crash(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(SimpleMLP(), path)
    monkeypatch.undo()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(load_model(path)(x), first(x))
    assert [p.name for p in tmp_path.iterdir()] == ["job.pt"]


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    elif not torch.backends.mps.is_available():
        assert auto == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


SAVER = """
import sys, torch
from pathlib import Path
from service.ml import atomic_torch_save
path = Path(sys.argv[1])
i = 0
while True:
    i += 1
    atomic_torch_save({"version": torch.full((2_000_000,), float(i))}, path)
    print(i, flush=True)
"""


def test_a_process_killed_while_saving_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    for saves in (1, 2, 3, 5):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        for _ in range(saves):
            proc.stdout.readline()  # a save has completed and the next one begins at once
        proc.kill()  # so the kill lands inside a save, while the temporary file is written
        proc.wait()
        state = torch.load(path, weights_only=True)
        version = state["version"]
        assert torch.equal(version, torch.full_like(version, version[0].item()))
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "state.pt"]
        for name in leftovers:  # a torn temporary may stay behind; it is never the checkpoint
            assert name.startswith(".state.pt.") and name.endswith(".tmp")
