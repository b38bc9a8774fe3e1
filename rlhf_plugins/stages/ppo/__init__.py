"""The PPO/GRPO stage: `settings` (PPOSettings), `train` (check, prepare, run), `prompts`, `rewards`,
`options`, and the trainer (`trainer`, with `loss`, `rollout_rewards`, `kl`, `value_head`)."""
