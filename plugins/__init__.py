"""Built-in plugins, one module per family; installed as `rlhf_plugins.builtin`.

Each module registers its components through the same public hooks a third-party plugin uses.
"""
