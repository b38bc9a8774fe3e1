"""The Python snippets of the user guides run, in order, as a reader would paste them."""
from __future__ import annotations

import pytest

from test_docs import DOCS, _python_blocks

pytest.importorskip("torch")


@pytest.mark.parametrize("page", ["your_own_model_data_rm.md", "python_api.md"])
def test_doc_snippets_run(page, capsys):
    blocks = _python_blocks(DOCS / page)
    assert len(blocks) >= 4
    namespace: dict = {"__name__": f"docs_{page}"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page} block {i + 1}", "exec"), namespace)  # noqa: S102
