"""Built-in advantages plugin components (placeholder: filled by its issue)."""
from __future__ import annotations

from rlhf_plugins import hookimpl
