"""The registry: method name -> module. The only file that knows them all.

Every method module follows one contract: NAME, TITLE, SIZE_FIELDS, Config, apply, config,
param_groups, extra_loss, after_backward, after_step, ranks, to_lora, can_merge, merge (the hook
order is in each file's Usage block).
Saving and loading adapters is adapters.py's.
"""
import importlib

NAMES = ("lora", "sara", "mosara", "sora", "adalora", "alora", "salora")


def get(name):
    if name not in NAMES:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(NAMES)})")
    return importlib.import_module(f"methods.{name}")
