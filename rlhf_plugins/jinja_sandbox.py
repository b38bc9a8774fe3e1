"""Render user-supplied chat templates (a tokenizer's `chat_template`, a template file) safely.

Templates run in `jinja2.sandbox.ImmutableSandboxedEnvironment` with the same options and
helpers transformers gives chat templates (`trim_blocks`, `lstrip_blocks`, loop controls, a
JSON `tojson`, `raise_exception`, `strftime_now`, a no-op `{% generation %}` block), so a
template renders here exactly as `tokenizer.apply_chat_template(..., tokenize=False)` renders it.
"""
from __future__ import annotations

import functools
import json
from typing import Any

from .errors import ConfigError, DataError


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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"chat template: Jinja syntax error at line {exc.lineno}: {exc.message}") from None


def render_template(source: str, **context: Any) -> str:
    """Render Jinja `source` in the sandbox; template errors become `DataError`."""
    import jinja2

    template = compile_template(source)
    try:
        return template.render(**context)
    except jinja2.exceptions.SecurityError as exc:
        raise DataError(f"chat template: blocked by the Jinja sandbox: {exc}") from None
    except jinja2.TemplateError as exc:
        raise DataError(f"chat template: {exc}") from None
