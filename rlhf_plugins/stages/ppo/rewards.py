"""PPO's reward-model rewards: a trained reward model (attached adapter or a separate model)
as a TRL-style reward function, with step rewards for a process reward model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ...errors import ConfigError

if TYPE_CHECKING:
    from .settings import PPOSettings

logger = logging.getLogger("rlhf_plugins.stages.ppo.train")


def reward_adapter_function(scorer: Any, tokenizer: Any = None, template: Any = None,
                            name: str = "reward_adapter") -> Any:
    """A TRL-style reward function scoring with a reward model (attached adapter or separate).

    The one scorer `sample` and `best-of-n` use too (:func:`~rlhf_plugins.stages.reward_model.scoring.reward_model_function`);
    the shared model's train/eval mode and active adapter are restored after each call, and an
    empty completion is unscored (None).
    """
    from ..reward_model.scoring import reward_model_function

    if tokenizer is not None:
        scorer.tokenizer = tokenizer
    if template is not None:
        scorer.template = template
    return reward_model_function(scorer, name=name)


def prm_reward_function(scorer: Any, mode: str = "probability", tokenizer: Any = None,
                        template: Any = None, name: str = "reward_adapter",
                        batch_size: int = 16) -> Any:
    """A TRL-style reward function giving a PRM's **step rewards** for each completion.

    The completion is split into steps on the head's ``delimiter`` (as the PRM was trained);
    each step's reward sits at its end offset: P(correct) (``mode="probability"``) or +1/0/-1
    by the arg-max class (``mode="sign"``). A completion with no non-blank step is unscored.
    """
    from ...rewarding import completion_text
    from ...step_rewards import PRM_MODES, prm_step_rewards, step_end_offsets
    from ..reward_model.scoring import step_outputs

    if mode not in PRM_MODES:
        raise ConfigError(f"prm_reward: expected one of {', '.join(PRM_MODES)}, got {mode!r}")
    if tokenizer is not None:
        scorer.tokenizer = tokenizer
    if template is not None:
        scorer.template = template
    delimiter = getattr(scorer.head, "delimiter", "\n\n")
    backbone = getattr(scorer, "backbone", scorer)

    def prm_reward(prompts: list, completions: list, **_: Any) -> list[Any]:
        texts = [completion_text(c) for c in completions]
        ends = [step_end_offsets(t, delimiter) for t in texts]
        keep = [i for i, e in enumerate(ends) if e]
        out: list[Any] = [None] * len(texts)
        if not keep:
            return out
        was_training = backbone.training
        try:
            rows = [{"prompt": prompts[i], "completion": texts[i]} for i in keep]
            results = step_outputs(scorer, rows, batch_size=batch_size)
        finally:
            backbone.train(was_training)
        if mode == "probability":
            probs = [r["p_correct"] for r in results]
        else:  # one-hot of the predicted class (labels -1/0/+1 -> classes 0/1/2)
            probs = [[[float(c == label + 1) for c in range(3)] for label in r["predicted"]]
                     for r in results]
        for i, steps in zip(keep, prm_step_rewards(probs, [ends[i] for i in keep], mode)):
            out[i] = steps
        return out

    prm_reward.__name__ = prm_reward.__qualname__ = name
    return prm_reward


def scorer_function(scorer: Any, settings: PPOSettings, name: str, tokenizer: Any = None,
                     template: Any = None) -> Any:
    """The reward function of a reward-model scorer: step rewards for a PRM (``prm_reward``)."""
    from ...protocols import member

    head = scorer.head
    if settings.prm_reward != "score" and member(head, "reward_heads", "label_kind") == "step" \
            and member(head, "reward_heads", "has_step_outputs"):
        return prm_reward_function(scorer, settings.prm_reward, tokenizer, template, name=name)
    return reward_adapter_function(scorer, tokenizer, template, name=name)


def same_base(meta: Mapping[str, Any], model_path: str) -> bool:
    from ...models import base_model_of, resolve_model

    base = meta.get("base_model")
    if not base:
        return False
    try:
        return Path(resolve_model(base)).resolve() == Path(base_model_of(model_path)).resolve()
    except Exception:  # noqa: BLE001 - an unresolvable reference is simply not the same base
        return False


def load_reward_scorer(settings: PPOSettings, policy: Any, model_path: str) -> tuple[Any, bool]:
    """The `reward_model` scorer and whether it shares the policy's base.

    A reward adapter trained on the policy's base with the policy's quantization is attached
    to the policy (a second adapter, no second base); anything else (another base, another
    quantization, a full or transformers reward model) loads as a separate model, as trained.
    """
    from ...models import quant_settings
    from ..reward_model.artifact import META_FILE, attach_reward_adapter, load_reward_model, read_meta

    directory = Path(settings.reward_model)
    meta = read_meta(directory) if (directory / META_FILE).is_file() else {}
    if meta.get("adapter") and hasattr(policy, "peft_config") and same_base(meta, model_path) \
            and quant_settings(meta.get("quantization")) == settings.quantization:
        return attach_reward_adapter(policy, directory, "reward"), True
    if meta.get("adapter"):
        logger.info("reward_model %s: trained on %s (quantization %s); loading it as a separate "
                    "model, as it was trained", directory, meta.get("base_model"),
                    meta.get("quantization"))
    scorer = load_reward_model(directory)
    import torch

    from ...models import is_quantized

    if torch.cuda.is_available() and not is_quantized(scorer.backbone):
        scorer = scorer.to("cuda")
    for p in scorer.parameters():
        p.requires_grad_(False)
    return scorer, False
