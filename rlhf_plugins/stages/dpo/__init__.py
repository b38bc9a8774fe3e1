"""The `dpo` stage: preference pairs -> template + masking plugins -> TRL's DPOTrainer with a
`preference_losses` component as its loss."""
