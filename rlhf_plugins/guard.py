"""Guards where plugin code and user input enter: every failure is one line naming the place.

- :func:`guarded` / :func:`call_component`: a component (template, masking strategy, reward
  function, selection rule, estimator, head, policy or preference loss) that raises inside one
  of its members becomes a :class:`~rlhf_plugins.errors.ComponentError` naming the component,
  the plugin and distribution that provide it, the member and the original message. Errors the
  component raises on purpose (the project's own exceptions) pass through unchanged.
- :func:`check_mask`: a masking strategy's output is one 0/1 value per token.
- :func:`located`: the same exception, its message prefixed with a place (file, row).
- :func:`check_output_dir`: an output folder that is a file (or under one, or not writable) is a
  ConfigError before any model loads.
- :func:`check_model_ref`: a `model:` reference that cannot exist, without loading anything.
- :func:`row_place`: ``source row N`` with N the file's 1-based line for JSON lines (of the
  row's index in the file, whatever split or shuffle it went through since).

Light module: no torch import.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from .errors import ComponentError, ConfigError, DataError, RlhfPluginsError
from .protocols import FAMILIES

__all__ = ["FAMILY_LABELS", "call_component", "check_loss", "check_mask", "check_metrics",
           "check_model_ref", "check_output_dir", "component_error", "component_origin",
           "contract_error", "guarded", "located", "one_line", "row_errors", "row_number", "row_place"]

#: how a family's component is called in messages
FAMILY_LABELS = {name: spec.label for name, spec in FAMILIES.items()}

#: longest original message kept in a wrapped error (a component may raise megabytes of text)
_MAX_MESSAGE = 500


def one_line(text: str, limit: int | None = None) -> str:
    """`text` on one line (newlines folded), cut to `limit` characters when given."""
    flat = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if limit is not None and len(flat) > limit:
        flat = flat[:limit - 3] + "..."
    return flat


def component_origin(component: Any, family: str) -> tuple[str, str]:
    """(registered name, ``plugin 'P', distribution D V``) of a component.

    Looked up in the registry by identity, else by type and name (a configured copy); a component
    that was never registered is named by its type and module.
    """
    name = getattr(component, "name", None) or getattr(component, "__name__", None) \
        or type(component).__name__
    try:
        from .manager import registry

        fam = registry().family(family)
        entries = fam.entries()
        match = next(((key, e) for key, e in entries if e.component is component), None)
        if match is None and not inspect.isroutine(component):  # a configured copy
            match = next(((key, e) for key, e in entries
                          if type(e.component) is type(component) and key == name), None)
        if match is not None:
            key, entry = match
            prov = entry.provenance
            dist = " ".join(x for x in (prov.distribution, prov.version) if x)
            return key, f"plugin {prov.plugin!r}" + (f", distribution {dist}" if dist else "")
    except RlhfPluginsError:  # pragma: no cover - an unknown family
        pass
    module = getattr(component, "__module__", None) or type(component).__module__
    return str(name), f"not registered, from module {module!r}"


def component_error(component: Any, family: str, action: str, exc: BaseException) -> ComponentError:
    """The one-line ComponentError for `exc` raised by `component` in `action`."""
    detail = one_line(str(exc), _MAX_MESSAGE)
    return contract_error(component, family, f"raised {type(exc).__name__} in {action}"
                          + (f": {detail}" if detail else ""), action)


def contract_error(component: Any, family: str, what: str, action: str = "__call__()") -> ComponentError:
    """"<kind> '<name>' <what> [<plugin>]": `component` raised or broke its family's contract."""
    name, origin = component_origin(component, family)
    kind = FAMILY_LABELS.get(family, f"{family} component")
    return ComponentError(f"{kind} {name!r} {what} [{origin}]", family=family, component=name,
                          plugin=origin, action=action)


@contextlib.contextmanager
def guarded(component: Any, family: str, action: str) -> Iterator[None]:
    """Run the block; an unexpected exception from it becomes a ComponentError naming `component`."""
    try:
        yield
    except RlhfPluginsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside plugin code is the plugin's
        raise component_error(component, family, action, exc) from exc


def call_component(component: Any, family: str, action: str, fn: Callable[..., Any],
                   *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` (a member of `component`) under :func:`guarded`."""
    with guarded(component, family, action):
        return fn(*args, **kwargs)


def check_mask(mask: Any, n_tokens: int, component: Any) -> list[int]:
    """A masking strategy's output as a list of 0/1 ints, one per token; ComponentError otherwise."""
    def fail(why: str) -> ComponentError:
        return contract_error(component, "masking_strategies", f"returned {why}", "mask()")

    if hasattr(mask, "tolist") and not isinstance(mask, (list, tuple)):
        mask = mask.tolist()  # numpy arrays / tensors, without importing either
    if isinstance(mask, (str, bytes)) or not isinstance(mask, Sequence):
        raise fail(f"{type(mask).__name__}, expected a list of 0/1 values")
    if len(mask) != n_tokens:
        raise fail(f"{len(mask)} values for {n_tokens} tokens (one 0/1 value per token)")
    out: list[int] = []
    for i, value in enumerate(mask):
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            out.append(int(value))
        else:
            raise fail(f"{value!r} at token {i} (values must be 0 or 1)")
    return out


def check_loss(value: Any, component: Any, family: str, action: str = "__call__()", *,
               needs_grad: bool = False, given: str = "") -> Any:
    """A component's loss: a tensor holding one number that carries a gradient when `needs_grad`;
    else a :func:`contract_error` (`given` describes the inputs)."""
    if not (hasattr(value, "numel") and hasattr(value, "requires_grad")):
        raise contract_error(component, family, f"returned a loss of type {type(value).__name__}, "
                             "expected a tensor holding one number", action)
    if value.numel() != 1:
        raise contract_error(component, family, f"returned a loss of shape {list(value.shape)}{given}; "
                             "expected one number (aggregate over the batch)", action)
    if needs_grad and not value.requires_grad:
        raise contract_error(component, family, "returned a loss that does not depend on the model's "
                             "outputs (detached): the update would train nothing", action)
    return value


def check_metrics(metrics: Any, component: Any, family: str, action: str = "__call__()") -> None:
    """A component's `.metrics`: a mapping of names to numbers (ints, floats or one-element
    tensors); else a :func:`contract_error`."""
    from numbers import Real

    def number(v: Any) -> bool:
        return isinstance(v, Real) or (hasattr(v, "numel") and hasattr(v, "item") and v.numel() == 1)

    if isinstance(metrics, Mapping) and all(isinstance(k, str) and number(v) for k, v in metrics.items()):
        return
    text = repr(metrics)
    text = text if len(text) <= 80 else text[:77] + "..."
    raise contract_error(component, family, f"returned .metrics {text}; expected a mapping of names "
                         "to numbers", action)


def located(exc: RlhfPluginsError, where: str) -> RlhfPluginsError:
    """A copy of `exc` (same class and attributes) whose message starts with `where: `."""
    text = str(exc)
    if not where or text.startswith(where):
        return exc
    new = copy.copy(exc)
    new.args = (f"{where}: {text}",)
    new.__cause__, new.__context__, new.__suppress_context__ = exc.__cause__, None, True
    return new


@contextlib.contextmanager
def row_errors(place: str) -> Iterator[None]:
    """Encoding one row at `place` (`file: row N`): a component's failure keeps its class, now
    located there; any other error of the row becomes one DataError line naming the place."""
    try:
        yield
    except ComponentError as exc:  # a plugin's failure, not a bad row: keep its class
        raise located(exc, place) from exc.__cause__
    except RlhfPluginsError as exc:
        new = DataError(f"{place}: {exc}")
        if getattr(exc, "reason", None):  # why the row is bad (stages.bad_rows counts it)
            new.reason = exc.reason  # type: ignore[attr-defined]
        raise new from None
    except (ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{place}: {type(exc).__name__}: {exc}") from None


def check_output_dir(path: str | os.PathLike, where: str = "output_dir") -> Path:
    """`path` as a Path, or ConfigError when it (or a parent) is a file or it is not writable."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where}: {out} exists and is not a directory")
    parent = out
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{where}: {out}: {parent} is a file, not a directory")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: {out}: {parent} is not writable")
    return out


def check_model_ref(ref: Any, where: str = "model") -> None:
    """ConfigError when `ref` names a local model that does not exist (nothing is loaded)."""
    from .default_model import DEFAULT_MODEL_ALIASES

    if ref is None or (isinstance(ref, str) and ref.strip().lower() in DEFAULT_MODEL_ALIASES):
        return
    if not isinstance(ref, (str, os.PathLike)):
        raise ConfigError(f"{where}: expected a model directory, hub id or .gguf file, got {ref!r}")
    text = os.fspath(ref)
    if text.endswith(".gguf"):
        if not Path(text).expanduser().is_file():
            raise ConfigError(f"{where}: {text}: GGUF file not found")
        return
    from .default_model import resolve_model

    try:
        resolve_model(text)  # local paths are checked, hub ids only by their shape
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(f"{where}: {message.removeprefix('model: ')}") from None


def row_number(source: str, index: int) -> int:
    """The 1-based number users see for row `index` (0-based) of `source`: for a JSON-lines file
    its line number (blank lines counted, as an editor shows them), else ``index + 1``."""
    path = Path(str(source))
    if path.suffix.lower() in (".csv", ".parquet", ".arrow") or not path.is_file():
        return index + 1
    try:
        lines = _content_lines(str(path), path.stat().st_mtime_ns, path.stat().st_size)
    except OSError:
        return index + 1
    return lines[index] if lines is not None and 0 <= index < len(lines) else index + 1


def row_place(source: str, index: int, label: str | None = None) -> str:
    """``label row N`` (`label` defaults to `source`) with N from :func:`row_number`: the user's
    number of row `index` (0-based, in the order `source` holds its rows - map a row of a
    shuffled or split subset back to that index first)."""
    return f"{label or source} row {row_number(source, index)}"


_LINE_CACHE: dict[tuple[str, int, int], list[int] | None] = {}


def _content_lines(path: str, mtime: int, size: int) -> list[int] | None:
    """1-based numbers of the non-blank lines of a JSON-lines file (None: a JSON array file)."""
    key = (path, mtime, size)
    if key not in _LINE_CACHE:
        if len(_LINE_CACHE) > 16:
            _LINE_CACHE.clear()
        with open(path, "rb") as handle:
            lines = [n for n, line in enumerate(handle, 1) if line.strip()]
        with open(path, "rb") as handle:
            head = handle.read(4096).lstrip()
        _LINE_CACHE[key] = None if head.startswith(b"[") else lines
    return _LINE_CACHE[key]
