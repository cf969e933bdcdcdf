"""Which reference and reward actors serve which PPO train worker (ppo.workers_per_actor)."""

from __future__ import annotations

import pytest

from bp_ray.config_loader import load_config
from bp_ray.train.ppo_actors import actor_group, actor_groups


@pytest.mark.parametrize(("workers", "per_actor", "groups", "ranks_to_groups"), [
    (8, 0, 1, [0] * 8),                     # 0: one reference and one reward actor for all, as before the key
    (8, 2, 4, [0, 0, 1, 1, 2, 2, 3, 3]),    # the paper preset: 8 workers -> 4 of each
    (8, 3, 3, [0, 0, 0, 1, 1, 1, 2, 2]),    # ceil(8 / 3) = 3: the last group is smaller
    (2, 1, 2, [0, 1]),                      # one pair of actors per worker
    (2, 4, 1, [0, 0]),                      # more per actor than workers: one group
])
def test_workers_map_to_consecutive_groups_of_workers_per_actor(workers, per_actor, groups, ranks_to_groups):
    assert actor_groups(workers, per_actor) == groups
    assert [actor_group(rank, per_actor) for rank in range(workers)] == ranks_to_groups
    assert max(ranks_to_groups) == groups - 1  # every actor started serves a worker


def test_presets_keep_one_pair_of_actors_except_paper_which_starts_four():
    assert load_config("tiny").ppo.workers_per_actor == 0
    paper = load_config("paper").ppo
    assert actor_groups(paper.resources.num_workers, paper.workers_per_actor) == 4


def test_workers_hold_their_gpu_share_so_actors_fit_beside_them():
    from bp_ray.config import TrainResources
    from bp_ray.train.loop import worker_gpus

    assert worker_gpus(TrainResources(num_workers=8, use_gpu=True)) == 8
    # one GPU: the worker holds 0.6, the reference and reward actors 0.2 each
    assert worker_gpus(TrainResources(num_workers=1, use_gpu=True, gpus_per_worker=0.6)) == 0.6
    assert worker_gpus(TrainResources(num_workers=4, use_gpu=False, gpus_per_worker=0.6)) == 0
