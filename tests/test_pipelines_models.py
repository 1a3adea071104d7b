"""Models of the pipelines: the paper's Table 3 parameter counts and working forward passes."""

from __future__ import annotations

import pytest
import torch

from pipelines.models import build_model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "classes", "paper_millions"), [
    ("wrn-40-10", 100, 55.9),     # Table 3: WideResNet, CIFAR-100
    ("inception-v4", 100, 41.3),  # Table 3: Inception-v4, CIFAR-100
    ("resnet20", 10, 0.27),       # He et al. (2016): ResNet-20, CIFAR-10
    ("resnet32", 10, 0.46),
])
def test_parameter_counts_match_the_paper(name: str, classes: int, paper_millions: float) -> None:
    # The paper rounds to 0.1M (0.01M for the small ResNets): the count must round to the same.
    digits = 1 if paper_millions > 1 else 2
    assert round(count(build_model(name, classes)) / 1e6, digits) == paper_millions


@pytest.mark.parametrize(("name", "shape"), [("cnn1d", (40,)), ("mlp", (64,)), ("resnet20", (3, 32, 32)),
                                             ("wrn-10-1", (3, 32, 32)), ("torchvision:resnet18", (3, 32, 32))])
def test_models_map_a_batch_to_class_scores(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, 7, shape).eval()
    assert model(torch.randn(3, *shape)).shape == (3, 7)


def test_inception_v4_runs_on_cifar_images() -> None:
    # Small spatial sizes are where an ImageNet Inception breaks: the stem halves 32 x 32 only once.
    model = build_model("inception-v4", 100).eval()
    with torch.no_grad():
        x = model.stem(torch.randn(1, 3, 32, 32))
        assert x.shape == (1, 384, 16, 16)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("name", ["wrn-41-10", "wrn-40", "resnet21", "vgg", "torchvision:nonexistent"])
def test_unknown_or_malformed_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        build_model(name, 10)


def test_resolve_model_specs() -> None:
    from pipelines.models import resolve_model

    model, shape = resolve_model("wrn-16-1")
    assert shape == (3, 32, 32) and model.fc.out_features == 100  # CIFAR-100, as in Table 3
    model, shape = resolve_model("torchvision:resnet18")
    assert shape == (3, 224, 224) and model.fc.out_features == 1000
    model, shape = resolve_model("torch.nn:Identity", (5,))
    assert isinstance(model, torch.nn.Identity) and shape == (5,)
    with pytest.raises(ValueError, match="cannot import"):
        resolve_model("no_such_module:factory")
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        resolve_model("builtins:dict")
