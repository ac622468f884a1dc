import pytest
import torch

import toolkit
from toolkit import registry
from toolkit.types import Batch, as_batch, check_targets, require_index


def test_as_batch_forms():
    x, y, i = torch.randn(3, 2), torch.tensor([0, 1, 0]), torch.tensor([5, 6, 7])
    assert as_batch((x, y)) == Batch(x, y, None)
    b = as_batch((x, y, i))
    assert b.index is i and b.target is y
    b = as_batch({"image": x, "label": y, "idx": i})
    assert b.input is x and b.target is y and b.index is i
    text = as_batch({"input_ids": torch.ones(3, 4), "attention_mask": torch.ones(3, 4), "labels": y})
    assert set(text.input) == {"input_ids", "attention_mask"} and text.target is y and text.size == 3
    with pytest.raises(ValueError, match="tuple batch"):
        as_batch((x, y, i, i))


def test_batch_survives_default_collate():
    items = [Batch(torch.randn(2), torch.tensor(1), torch.tensor(k)) for k in range(4)]
    b = torch.utils.data.default_collate(items)
    assert isinstance(b, Batch) and b.index.tolist() == [0, 1, 2, 3]


def test_missing_index_error_names_the_method_and_the_fix():
    with pytest.raises(ValueError, match=r"ps_kd.*IndexedDataset"):
        require_index(Batch(torch.randn(2, 3), torch.tensor([0, 1])), "ps_kd")


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels out of range.*\[0, 12\].*10 classes"):
        check_targets(torch.tensor([0, 12]), 10)
    with pytest.raises(ValueError, match="labels out of range"):
        check_targets(torch.tensor([-1, 2]), 10)
    check_targets(torch.tensor([0, 9]), 10)


def test_build_and_close_matches():
    kd = toolkit.build("distiller", "kd", temperature=2.0)
    assert kd.temperature == 2.0
    with pytest.raises(KeyError, match=r"unknown distiller 'kdd'.*Did you mean 'kd'"):
        toolkit.build("distiller", "kdd")
    with pytest.raises(KeyError, match="Did you mean 'distiller'"):
        registry.names("distillers")
    with pytest.raises(KeyError, match="already registered"):
        registry.register("distiller", "kd")(object)


def test_registry_lists_core_names():
    assert "kd" in registry.names("distiller")
    assert "cross_entropy" in registry.names("loss")
    assert {"digits", "fashion_mnist", "cifar10", "cifar100", "image_folder"} <= set(registry.names("data"))
    assert {"resnet8x4", "resnet32x4", "wrn_40_2", "wrn_16_2"} <= set(registry.names("model"))
    assert {"sgd", "adam", "adamw"} <= set(registry.names("optimizer"))
