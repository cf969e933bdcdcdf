"""Training stages (SFT, reward models, PPO): pure data / config / metrics helpers plus thin Ray Train drivers."""
