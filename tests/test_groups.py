"""Worker-group layout: groups per model = devices / TP, each with its device slice."""

import pytest

from container.groups import LayoutError, count_gpus, plan_groups, resolve_tp


def test_four_gpus_tp2_gives_two_groups():
    groups = plan_groups(tp=2, gpus=["0", "1", "2", "3"])
    assert [(g.index, g.visible_devices) for g in groups] == [(0, "0,1"), (1, "2,3")]


def test_eight_gpus_tp2_four_copies_and_tp_max():
    gpus = [str(i) for i in range(8)]
    assert len(plan_groups(tp=2, gpus=gpus)) == 4
    assert resolve_tp("max", 8) == 8 and resolve_tp(2, 8) == 2
    assert [g.visible_devices for g in plan_groups(tp=8, gpus=gpus)] == ["0,1,2,3,4,5,6,7"]


def test_leftover_gpus_are_not_used():
    assert [g.visible_devices for g in plan_groups(tp=2, gpus=["0", "1", "2"])] == ["0,1"]


def test_cpu_defaults_to_one_group_and_is_configurable():
    assert [(g.tp, g.devices) for g in plan_groups(tp=2, gpus=[])] == [(2, ())]
    assert len(plan_groups(tp=2, gpus=[], cpu_devices=4)) == 2
    assert resolve_tp(1, 0) == 1 and resolve_tp("max", 0) == 1


def test_impossible_layouts_name_the_numbers():
    with pytest.raises(LayoutError, match="tensor_parallel_degree=4 needs 4 GPUs but only 2"):
        plan_groups(tp=4, gpus=["0", "1"])
    with pytest.raises(LayoutError, match="LMC_CPU_DEVICES=1"):
        plan_groups(tp=2, gpus=[], cpu_devices=1)


def test_visible_devices_env_wins():
    assert count_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert count_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
