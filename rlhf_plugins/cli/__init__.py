"""The `rlhf-plugins` command line: one module per command group, discovered by `main`."""
