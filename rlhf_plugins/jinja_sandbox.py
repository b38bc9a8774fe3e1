"""Render user-supplied chat templates (a tokenizer's `chat_template`, a template file) safely.

Templates run in `jinja2.sandbox.ImmutableSandboxedEnvironment` with the same options and
helpers transformers gives chat templates (`trim_blocks`, `lstrip_blocks`, loop controls, a
JSON `tojson`, `raise_exception`, `strftime_now`, a no-op `{% generation %}` block), so a
template renders here exactly as `tokenizer.apply_chat_template(..., tokenize=False)` renders it.

Resource limits (each a one-line `DataError`, never an OverflowError/RecursionError traceback or
megabytes of output): `range()` of at most `MAX_RANGE` items, sequence repetition (`'x' * n`)
and powers bounded, macro recursion bounded by Python's own limit, at most `MAX_OUTPUT`
characters rendered and `TIME_LIMIT` seconds per render (checked in loops and on output).
"""
from __future__ import annotations

import functools
import json
import threading
import time
from typing import Any

from .errors import ConfigError, DataError

#: most items one `range()` may have (jinja2's own sandbox limit)
MAX_RANGE = 100_000
#: most characters a render may produce (a chat template renders one conversation)
MAX_OUTPUT = 16_000_000
#: most items/characters a `*` repetition may build, and the largest exponent of `**`
MAX_REPEAT = 1_000_000
MAX_EXPONENT = 4096
#: seconds one render may take
TIME_LIMIT = 30.0

_state = threading.local()  # the deadline of the render running in this thread


class _LimitError(Exception):
    """A resource limit of the sandbox was hit (reported as a DataError)."""


def _check_deadline() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _LimitError(f"took longer than {TIME_LIMIT:g} s")


class _Range:
    """`range()` for templates: at most MAX_RANGE items, the deadline checked while iterating."""

    def __init__(self, *args: int) -> None:
        self._range = range(*args)
        if len(self._range) > MAX_RANGE:
            raise _LimitError(f"range() of {len(self._range)} items (the limit is {MAX_RANGE})")

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        return self._range[index]

    def __contains__(self, item: Any) -> bool:
        return item in self._range

    def __iter__(self) -> Any:
        for count, value in enumerate(self._range):
            if count % 256 == 0:
                _check_deadline()
            yield value


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> Any:
    """Compile Jinja `source` in an immutable sandbox; `ConfigError` on a syntax error."""
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (HF's assistant-mask marker)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox with `*` and `**` bounded (no 100 MB string from `'x' * 10**8`)."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                            and len(seq) * times > MAX_REPEAT:
                        raise _LimitError(f"'*' would build {len(seq) * times} items "
                                          f"(the limit is {MAX_REPEAT})")
            if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT \
                    and isinstance(left, int) and abs(left) > 1:
                raise _LimitError(f"'**' with exponent {right} (the limit is {MAX_EXPONENT})")
            return super().call_binop(context, operator, left, right)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.globals["range"] = _Range
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"chat template: Jinja syntax error at line {exc.lineno}: {exc.message}") from None
    except (RecursionError, MemoryError) as exc:
        raise ConfigError(f"chat template: too deeply nested to compile ({type(exc).__name__})") from None


def render_template(source: str, **context: Any) -> str:
    """Render Jinja `source` in the sandbox; template errors and resource limits become `DataError`."""
    import jinja2

    template = compile_template(source)
    outer = getattr(_state, "deadline", None)
    _state.deadline = time.monotonic() + TIME_LIMIT if outer is None else outer
    try:
        pieces: list[str] = []
        size = 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise _LimitError(f"output longer than {MAX_OUTPUT} characters")
            _check_deadline()
            pieces.append(piece)
        return "".join(pieces)
    except _LimitError as exc:
        raise DataError(f"chat template: resource limit: {exc}") from None
    except RecursionError:
        raise DataError("chat template: resource limit: recursion too deep (a macro that calls "
                        "itself without end?)") from None
    except (OverflowError, MemoryError) as exc:
        raise DataError(f"chat template: resource limit: {type(exc).__name__}: {exc}") from None
    except jinja2.exceptions.SecurityError as exc:
        raise DataError(f"chat template: blocked by the Jinja sandbox: {exc}") from None
    except jinja2.TemplateError as exc:
        raise DataError(f"chat template: {exc}") from None
    finally:
        _state.deadline = outer
