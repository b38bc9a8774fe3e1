"""The `kto` stage: unpaired rows labelled desirable or not -> template + masking plugins ->
TRL's KTOTrainer."""
