"""The embedded demo: a synthetic chat corpus and a tiny target trained on it (cached), so
`peagle demo` runs end to end offline on a CPU."""

from peagle.demo.corpus import generate_corpus, write_jsonl
from peagle.demo.tiny_lm import TargetSettings, default_cache_dir, target_accuracy, train_demo_target

__all__ = [
    "TargetSettings",
    "default_cache_dir",
    "generate_corpus",
    "target_accuracy",
    "train_demo_target",
    "write_jsonl",
]
