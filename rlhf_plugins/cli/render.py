"""`rlhf-plugins render`: show a conversation as a chat template renders it, and which tokens train."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

GREEN, RESET = "\x1b[1;42;30m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `render` command."""
    p = subparsers.add_parser("render", help="render a conversation with a chat template (and show the loss mask)")
    p.add_argument("conversation", help="JSON file: a list of {role, content} messages, or {\"messages\": [...]}")
    p.add_argument("--template", default="chatml", help="chat template name (default: chatml)")
    p.add_argument("--template-file", help="a Jinja chat template file (rendered sandboxed; overrides --template)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the embedded default model's)")
    p.add_argument("--masking", help="masking strategy: mark the trained tokens")
    p.add_argument("--add-generation-prompt", action="store_true", help="append the generation prompt")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour trained tokens (auto: when stdout is a terminal; else [[...]] markers)")
    p.set_defaults(func=run_render)


def read_conversation(path: str) -> list[dict]:
    """The messages of a JSON conversation file (a list, or an object with `messages`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of messages or an object with 'messages'")
    return data


def _tokenizer(args: argparse.Namespace, template: Any) -> Any:
    from .. import models
    from ..protocols import member

    if args.tokenizer:
        local = Path(args.tokenizer).expanduser()
        return models.load_tokenizer(local if local.is_dir() else models.resolve_model(args.tokenizer))
    if not member(template, "chat_templates", "needs_tokenizer"):
        return None  # the template brings its own vocabulary (e.g. harmony's o200k)
    try:
        return models.load_tokenizer(models.default_model_path())
    except ConfigError as exc:
        raise ConfigError(f"no tokenizer: pass --tokenizer PATH (the default model is unavailable: {exc})") from None


def marked_text(pieces: list[tuple[str, bool]], color: bool) -> str:
    """Join (text, trained) pieces, wrapping trained runs in ANSI colour or [[...]] markers."""
    out: list[str] = []
    for text, trained in pieces:
        if trained:
            out.append(f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}")
        else:
            out.append(text)
    return "".join(out)


def run_render(args: argparse.Namespace) -> int:
    """Print the rendered conversation (with trained tokens marked when --masking is given)."""
    from ..guard import located

    try:
        return _render(args)
    except DataError as exc:  # a bad message: name the file it came from
        raise located(exc, args.conversation) from None


def _render(args: argparse.Namespace) -> int:
    from .. import registry
    from ..guard import check_mask, guarded
    from ..protocols import member

    reg = registry()
    if args.template_file:
        template = reg.chat_templates.get("tokenizer", path=args.template_file)
        name = "tokenizer"
    else:
        template = reg.chat_templates.get(args.template)
        name = args.template
    messages = read_conversation(args.conversation)
    tokenizer = _tokenizer(args, template)
    gen = args.add_generation_prompt
    if not args.masking:
        with guarded(template, "chat_templates", "render_text()"):
            text = template.render_text(messages, tokenizer=tokenizer, add_generation_prompt=gen)
        sys.stdout.write(text + "\n")
        return 0
    strategy = reg.masking_strategies.get(args.masking)
    with guarded(template, "chat_templates", "encode()"):
        encoded = template.encode(messages, tokenizer=tokenizer, add_generation_prompt=gen)
    with guarded(strategy, "masking_strategies", "mask()"):
        raw = strategy.mask(encoded)
    mask = check_mask(raw, len(encoded.input_ids), strategy)  # never a truncated render
    decode = member(template, "chat_templates", "decode")
    pieces: list[tuple[str, bool]] = []
    start = 0
    for k in range(1, len(mask) + 1):
        if k == len(mask) or mask[k] != mask[start]:
            pieces.append((decode(encoded.input_ids[start:k], tokenizer), bool(mask[start])))
            start = k
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    sys.stdout.write(marked_text(pieces, color) + "\n")
    sys.stderr.write(f"{sum(mask)} of {len(mask)} tokens trained ({args.masking}, {name})\n")
    return 0
