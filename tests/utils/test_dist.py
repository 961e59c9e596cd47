"""Distributed helpers: environment parsing, one-process fallback and slide sharding."""

from __future__ import annotations

import pytest

from gigaslide.utils import dist


def test_single_process_fallback(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = dist.init_distributed()
    assert info == dist.DistInfo(rank=0, world_size=1, local_rank=0, is_distributed=False)
    assert info.is_main
    dist.barrier()  # no process group: no-op
    dist.cleanup()


def test_env_parsing(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.dist_env() == dist.DistInfo(3, 4, 1, True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not dist.dist_env().is_distributed
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5 WORLD_SIZE=1"):
        dist.dist_env()


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_round_robin_covers_every_item_once(world):
    items = [f"s{i:02d}" for i in range(11)]
    shards = [dist.shard(items, r, world) for r in range(world)]
    assert sorted(x for s in shards for x in s) == items
    assert shards[0] == items[0::world]


def test_weighted_shard_balances_and_is_deterministic():
    items = ["a", "b", "c", "d", "e", "f"]
    weights = [100, 90, 10, 10, 10, 5]
    shards = [dist.shard(items, r, 2, weights=weights) for r in range(2)]
    assert sorted(x for s in shards for x in s) == items
    # greedy by decreasing weight: a->0, b->1, c->1 (100>90), d->0 (tie), e->1, f->0 (tie)
    assert shards == [["a", "d", "f"], ["b", "c", "e"]]
    loads = [sum(weights[items.index(x)] for x in s) for s in shards]
    assert abs(loads[0] - loads[1]) <= 5
    assert shards == [dist.shard(items, r, 2, weights=weights) for r in range(2)]
    assert all(s == sorted(s) for s in shards)  # original order kept


def test_shard_rejects_bad_arguments():
    with pytest.raises(ValueError, match="invalid rank 2"):
        dist.shard([1, 2], 2, 2)
    with pytest.raises(ValueError, match="1 weights for 2 items"):
        dist.shard([1, 2], 0, 2, weights=[1.0])
