"""peagle: a trainer for P-EAGLE (parallel-drafting EAGLE-3) draft heads.

The public engine: `DraftConfig`/`PEagleDraft` (the draft and its speculators-format checkpoint),
`PEagleTrainer` (one training step, flat or sequence-partitioned), `Batch` and `StepOutput`.
Exports resolve lazily so `import peagle.data` does not build the whole engine.
"""

from importlib import import_module

__all__ = ["Batch", "DraftConfig", "PEagleDraft", "PEagleTrainer", "StepMetrics", "StepOutput"]
__version__ = "0.1.0"

_HOME = {"DraftConfig": "model.config", "PEagleDraft": "model.draft", "Batch": "data.shift",
         "PEagleTrainer": "model.step", "StepMetrics": "model.step", "StepOutput": "model.step"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'peagle' has no attribute {name!r}")
