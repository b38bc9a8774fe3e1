"""The rejection-sampling stage (and best-of-N): `settings` (SamplingSettings), `prompts`,
`components`, `sampler` (SamplingRun), `outputs`, `run`."""
