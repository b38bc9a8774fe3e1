"""Moved to :mod:`rlhf_plugins.generation` (core: evaluation uses it too); re-exported here."""
from __future__ import annotations

from ..generation import (Completion, HFGenerator, VLLMGenerator, cut_at_stop_string, encode_prompt,
                          end_of_turn_stop_strings, end_of_turn_token_ids, sample_seed,
                          vllm_available)

__all__ = ["Completion", "HFGenerator", "VLLMGenerator", "cut_at_stop_string", "encode_prompt",
           "end_of_turn_stop_strings", "end_of_turn_token_ids",
           "sample_seed", "vllm_available"]
