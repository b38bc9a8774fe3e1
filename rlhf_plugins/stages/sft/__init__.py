"""The SFT stage: `settings` (SFTSettings), `dataset` (rows -> encoded conversations), `train`."""
