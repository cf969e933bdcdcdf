"""Which pairs PPO trains on: ppo.prompt_reward_below leaves out user prompts already at the reward's ceiling."""

from __future__ import annotations

import pandas as pd

from bp_ray.config_loader import load_config
from bp_ray.train.ppo import with_room


class WordsReward:
    """A reward that reads text: how many comma-separated tags a prompt has."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def scores(self, lows: list[str], texts: list[str]) -> dict[str, list[float]]:
        self.calls.append((lows, texts))
        return {"reward": [float(text.count(",")) for text in texts]}


def test_prompts_that_already_score_at_the_ceiling_are_left_out():
    pairs = pd.DataFrame({"low": ["a cat", "castle, artstation, 8k", "a dog, 8k", "a red car"],
                          "high": ["h1", "h2", "h3", "h4"], "pair_id": ["p1", "p2", "p3", "p4"]})
    reward = WordsReward()
    kept = with_room(pairs, reward, 1.0)
    assert kept["low"].tolist() == ["a cat", "a red car"] and kept.index.tolist() == [0, 1]
    assert reward.calls == [(pairs["low"].tolist(), pairs["low"].tolist())]  # each prompt as its own rewrite
    assert with_room(pairs, reward, None) is pairs and len(reward.calls) == 1


def test_the_small_preset_trains_ppo_on_prompts_with_room_and_others_on_every_pair():
    assert load_config("small").ppo.prompt_reward_below is not None
    assert load_config("tiny").ppo.prompt_reward_below is None
