"""The reward-model stage: `settings` (RMSettings), `model` (RewardModel), `artifact` (save, load,
attach), `hf_export`, `scoring`, `data`, `trainer` (RewardHeadTrainer), `train`."""
