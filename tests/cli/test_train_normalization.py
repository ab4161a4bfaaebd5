"""train.py normalises as the data's recipe says (cifar100+: CIFAR-100's mean and std), --init or not.

The rule (``training.normalization_for``): the recipe's ``normalize`` where it names one; else
the one an ``--init`` checkpoint was trained with; else the model's timm config. test_resnet's
timm config is (0.5, 0.5, 0.5), so each source is told apart.
"""

from __future__ import annotations

import pytest
import torch

from tests.cli.test_train_teachers import _fake_hf_cache, training_args
from tests.producer_data import make_image_folder
from wds_reinforce.cli import training
from wds_reinforce.core.augment import CIFAR100_MEAN, CIFAR100_STD, Recipe, normalize
from wds_reinforce.produce.checkpoint import save_checkpoint

HALF = (0.5, 0.5, 0.5)
OWN = {"mean": [0.25, 0.5, 0.75], "std": [0.2, 0.3, 0.4]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("norm")
    make_image_folder(root / "train", per_class=2, corrupt=False)
    return root


def _checkpoint(path, **extra):
    import timm

    net = timm.create_model("test_resnet", num_classes=3)
    save_checkpoint(path, net.state_dict(), "timm:test_resnet", ["a", "b", "c"], (32, 32), None, **extra)
    return str(path)


def _trainer(folder, recipe, init=None):
    args = training_args(folder, init=init)
    return training.Trainer(args, 3, torch.device("cpu"), 1, False, None, recipe)


def test_the_recipe_s_normalisation_wins_from_scratch_and_when_fine_tuning(folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cifar = Recipe.from_spec("cifar100+", size=32)
    ckpt = _checkpoint(tmp_path / "own.pt", normalize=OWN)
    _fake_hf_cache(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for init in (None, ckpt, "timm:test_resnet"):  # as apple/ml-dr's CIFAR-100 fine-tuning config
        trainer = _trainer(folder, cifar, init)
        assert (trainer.mean, trainer.std, trainer.normalized_by) == (CIFAR100_MEAN, CIFAR100_STD, "recipe"), init


def test_without_one_the_checkpoint_s_then_the_model_s(folder, tmp_path):
    plain = Recipe.from_spec("rrc", size=32)
    own = _trainer(folder, plain, _checkpoint(tmp_path / "own.pt", normalize=OWN))
    assert (list(own.mean), list(own.std), own.normalized_by) == (OWN["mean"], OWN["std"], "checkpoint")
    bare = _trainer(folder, plain, _checkpoint(tmp_path / "bare.pt"))  # saved before checkpoints named it
    assert (bare.mean, bare.std, bare.normalized_by) == (HALF, HALF, "model")
    assert _trainer(folder, plain).mean == HALF and _trainer(folder, None).mean == HALF


def test_training_and_evaluation_see_the_same_normalised_pixels(folder):
    trainer = _trainer(folder, Recipe.from_spec("cifar100+", size=32))
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    trainer.evaluate((images, torch.tensor([0, 1, 2, 0])))
    torch.testing.assert_close(seen[-1], normalize(images, CIFAR100_MEAN, CIFAR100_STD))
    loader = [(images, torch.full((4, 3), 1 / 3))]
    trainer.epoch(0, loader)
    torch.testing.assert_close(seen[-1], normalize(images, CIFAR100_MEAN, CIFAR100_STD))
