"""The shipped parameter-count table (what ``vision-ft models`` prints) against the architectures."""

import pytest

from vision_ft.models.registry import list_models
from vision_ft.models.summary import _table, abstract_parameter_count, parameter_count


def test_the_table_lists_every_registered_model_and_nothing_else():
    assert sorted(_table()) == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_table_entry_is_the_architectures_count(name):
    assert _table()[name] == abstract_parameter_count(name), "run scripts/write_parameter_counts.py"


def test_a_model_missing_from_the_table_is_counted_from_its_shapes(monkeypatch):
    parameter_count.cache_clear()
    monkeypatch.setitem(_table(), "resnet18", 1)
    assert parameter_count("resnet18") == 1
    parameter_count.cache_clear()
    monkeypatch.delitem(_table(), "resnet18")
    assert parameter_count("resnet18") == 11_689_512  # timm's resnet18
    parameter_count.cache_clear()
