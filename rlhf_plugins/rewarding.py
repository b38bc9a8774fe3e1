"""Calling reward functions (TRL's signature) outside TRL: validation and the weighted sum.

Reward functions have TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``.
The rejection-sampling stage, best-of-N and the policy-optimisation trainer call them through
:func:`call_reward_functions`, which checks every output and combines them the way TRL 1.16's
``GRPOTrainer`` does:

- ``None`` means "this function does not apply to this sample": it is excluded from the sum
  (TRL turns it into NaN and uses ``nansum``), so ``total[i] = sum(w_f * r_f[i] for the
  functions f whose r_f[i] is not None)``;
- a sample for which *every* function returned ``None`` is unscorable: its total is NaN
  (TRL 1.16 marks such rows NaN too, so they never get a spurious reward of 0; selection rules
  never select NaN);
- a wrong-length output, a non-number, NaN or +/-inf is a :class:`~rlhf_plugins.errors.DataError`
  naming the function (TRL only checks the length);
- with ``allow_step_rewards=True`` (the policy-optimisation trainer) a completion's reward may
  also be **step rewards**: a list of ``(end_char_offset, value)`` pairs (see
  :mod:`rlhf_plugins.step_rewards`); it counts as the sum of its values in the total.

Light module: no torch import.
"""
from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

from .errors import ConfigError, DataError, RlhfPluginsError

RewardFunc = Callable[..., Sequence[float | None]]


def reward_function_name(func: Any) -> str:
    """The name TRL logs a reward function under (``__name__``, partials unwrapped, else class name)."""
    from trl.trainer.utils import get_callable_name  # TRL's own rule, so the names always match

    return get_callable_name(func)


def message_text(content: Any) -> str:
    """The text of a message ``content`` (a string or a list of ``{"type": "text"}`` blocks)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and block.get("type", "text") == "text":
                parts.append(str(block.get("text", "")))
        return "".join(parts)
    return str(content)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the assistant content of a conversational completion.

    TRL passes conversational completions as ``[{"role": "assistant", "content": "..."}]``;
    several assistant messages are joined with a blank line; a bare message dict also works.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return message_text(completion.get("content"))
    if isinstance(completion, Sequence):
        messages = [m for m in completion if isinstance(m, Mapping)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"]
        return "\n\n".join(message_text(m.get("content")) for m in (assistant or messages))
    raise DataError(f"completion must be a string or a list of message dicts, got "
                    f"{type(completion).__name__}")


def prompt_text(prompt: Any) -> str:
    """The text of a prompt: a string, or the last user message of a conversational prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        users = [m for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
        if users:
            return message_text(users[-1].get("content"))
        return "\n\n".join(message_text(m.get("content")) for m in prompt if isinstance(m, Mapping))
    raise DataError(f"prompt must be a string or a list of message dicts, got {type(prompt).__name__}")


def _as_list(output: Any) -> list[Any] | None:
    if hasattr(output, "tolist") and not isinstance(output, (list, tuple)):
        output = output.tolist()  # numpy arrays / tensors, without importing either
    if isinstance(output, (list, tuple)):
        return list(output)
    return None


def _as_reward(value: Any) -> float | None | str:
    """A float, None, or an error string describing why `value` is not a valid reward."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) and hasattr(value, "item"):
        try:
            value = value.item()  # 0-dim tensors / arrays
        except (TypeError, ValueError):
            return f"a non-number ({type(value).__name__})"
    if not isinstance(value, numbers.Real):
        return f"a non-number ({value!r})"
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return f"{value} (NaN/inf are not allowed; return None to exclude a sample)"
    return value


def _unique_names(funcs: Sequence[Any]) -> list[str]:
    names: list[str] = []
    for func in funcs:
        base = reward_function_name(func)
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def call_reward_functions(
    funcs: Sequence[RewardFunc],
    weights: Sequence[float] | None,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    allow_step_rewards: bool = False,
    **columns: Any,
) -> tuple[list[float], dict[str, list[Any]]]:
    """Call each reward function, validate its output, and return (weighted total, per function).

    ``weights=None`` means weight 1 for every function. ``columns`` are passed through to every
    function as keyword arguments (like TRL passes the dataset's extra columns); list-valued
    columns must have one entry per completion. ``per_function`` maps each function's name
    (TRL's ``__name__`` rule; a repeated name gets ``_2``, ``_3`` ...) to its raw outputs
    (``None`` kept). ``total[i]`` is the ``nansum``-style weighted sum over the non-None
    outputs, or NaN when every function returned None for sample ``i``. With
    ``allow_step_rewards``, step-reward lists are kept (validated) in ``per_function`` and add
    their sum to the total.
    """
    funcs = list(funcs)
    if not funcs:
        raise ConfigError("no reward functions given")
    if weights is None:
        weights = [1.0] * len(funcs)
    weights = list(weights)
    if len(weights) != len(funcs):
        raise ConfigError(f"{len(weights)} reward weights given for {len(funcs)} reward functions")
    for func, w in zip(funcs, weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ConfigError(f"reward weight for {reward_function_name(func)!r} must be a finite "
                              f"number, got {w!r}")
    n = len(completions)
    if len(prompts) != n:
        raise DataError(f"{len(prompts)} prompts but {n} completions (one prompt per completion; "
                        "repeat each prompt for its completions)")
    for key, value in columns.items():
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise DataError(f"column {key!r} has {len(value)} values for {n} completions")

    names = _unique_names(funcs)
    per_function: dict[str, list[float | None]] = {}
    for func, name in zip(funcs, names):
        if not callable(func):
            raise ConfigError(f"reward function {name!r} is not callable")
        try:
            output = func(prompts=list(prompts), completions=list(completions), **columns)
            if inspect.isawaitable(output):
                output = asyncio.run(_await(output))
        except RlhfPluginsError:
            raise
        except Exception as exc:  # name the function, its plugin and distribution
            from .guard import component_error

            raise component_error(func, "reward_functions", "__call__()", exc) from exc
        values = _as_list(output)
        if values is None:
            raise DataError(f"reward function {name!r} returned {type(output).__name__}, "
                            "expected a list with one reward (float or None) per completion")
        if len(values) != n:
            raise DataError(f"reward function {name!r} returned {len(values)} rewards for "
                            f"{n} completions")
        clean: list[float | None] = []
        for i, value in enumerate(values):
            if allow_step_rewards and isinstance(value, (list, tuple)):
                reward = _as_step_rewards(value)
            else:
                reward = _as_reward(value)
            if isinstance(reward, str):
                raise DataError(f"reward function {name!r} returned {reward} for completion {i}")
            clean.append(reward)
        per_function[name] = clean

    total: list[float] = []
    for i in range(n):
        terms = [float(w) * reward_value_total(per_function[name][i]) for name, w in zip(names, weights)
                 if per_function[name][i] is not None]
        total.append(math.fsum(terms) if terms else math.nan)
    return total, per_function


def _as_step_rewards(value: Any) -> list[tuple[int, float]] | str:
    """Validated ``(end_char_offset, value)`` pairs, or an error string."""
    pairs: list[tuple[int, float]] = []
    for k, pair in enumerate(value):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
            return f"step rewards whose step {k} is not an (end_char_offset, value) pair ({pair!r})"
        offset, reward = pair
        if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 1:
            return f"step rewards whose step {k} end_char_offset is not an integer >= 1 ({offset!r})"
        checked = _as_reward(reward)
        if checked is None or isinstance(checked, str):
            return f"step rewards whose step {k} value is {checked or 'None'}"
        pairs.append((int(offset), checked))
    return pairs


def reward_value_total(value: float | None | Sequence[tuple[int, float]]) -> float | None:
    """A completion's reward as one number: a float, None, or the sum of its step rewards."""
    if isinstance(value, (list, tuple)):
        return math.fsum(v for _, v in value)
    return value


async def _await(awaitable: Any) -> Any:
    return await awaitable


def resolve_reward_functions(
    specs: Sequence[Any], registry: Any = None,
) -> tuple[list[RewardFunc], list[float]]:
    """Turn reward-function specs into (functions, weights) using the registry.

    A spec is a registered name (``"exact_answer"``), a callable, or a mapping
    ``{"name": ..., "weight": 1.0, **options}`` (options go to the component's ``configure``).
    Unknown names raise :class:`~rlhf_plugins.errors.UnknownComponentError` before any work.
    """
    if registry is None:
        from .manager import registry as get_registry

        registry = get_registry()
    family = registry.family("reward_functions")
    funcs: list[RewardFunc] = []
    weights: list[float] = []
    for k, spec in enumerate(specs):
        weight: Any = 1.0
        if isinstance(spec, str):
            func = family.get(spec)
        elif isinstance(spec, Mapping):
            options = dict(spec)
            name = options.pop("name", None)
            if not isinstance(name, str):
                raise ConfigError(f"reward function spec #{k} needs a 'name' (got {spec!r})")
            weight = options.pop("weight", 1.0)
            nested = options.pop("options", None)
            if nested is not None:
                if not isinstance(nested, Mapping):
                    raise ConfigError(f"reward function {name!r}: 'options' must be a mapping")
                options.update(nested)
            func = family.get(name, **options)
        elif callable(spec):
            func = spec
        else:
            raise ConfigError(f"reward function spec #{k} must be a name, a mapping or a "
                              f"callable, got {type(spec).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ConfigError(f"reward function {reward_function_name(func)!r}: weight must be a "
                              f"finite number, got {weight!r}")
        from .protocols import member

        # an optional dependency missing: say so before any model loads
        member(func, "reward_functions", "check_requirements")()
        funcs.append(func)
        weights.append(float(weight))
    return funcs, weights
