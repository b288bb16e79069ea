"""A prepared dataset on disk: its layout, loading it back, and checking it belongs to a target.

``peagle prepare`` (``peagle.data.preparation``) writes one directory: ``dataset/`` (HF
``save_to_disk``), ``manifest.json`` (sources, tokenizer fingerprint, template sha256, counts and
the draft vocabulary + mask token chosen, under ``draft_vocab``) and ``token_counts.safetensors``.
:func:`load_prepared` reads it back as :class:`PreparedData`; :func:`check_dataset_matches_target`
refuses a dataset tokenized by another tokenizer or chat template than the target's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peagle.data.records import DataError
from peagle.data.vocab import DraftVocab, build_draft_vocab

MANIFEST = "manifest.json"
TOKEN_COUNTS = "token_counts.safetensors"
DATASET_SUBDIR = "dataset"
FORMAT = "peagle-prepared-v1"


def sha256_text(text: str) -> str:
    """Hex sha256 of a text (chat templates are recorded and compared by it)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """``{"class", "len", "vocab_sha256"}``: the sha256 covers every (token, id) pair, added tokens
    included, so two tokenizers of the same size but another vocabulary differ."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"class": type(tokenizer).__name__, "len": len(tokenizer), "vocab_sha256": digest}


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained(path)``; failure is a one-line DataError naming the path."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load a tokenizer from {path}: {first}") from None


def check_dataset_matches_target(
    manifest: Mapping[str, Any],
    tokenizer: Any,
    *,
    dataset: str | Path = "the dataset",
    target: str | Path | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Refuse a prepared dataset whose tokenizer (class, length, vocabulary sha256) or chat template
    differ from the target's; ``tokenizer`` is a tokenizer or a directory to load one from.

    Raises one-line DataError naming each difference. Checks only what the manifest records (older
    datasets have no vocab sha256); the template is compared when the data was prepared with the
    tokenizer's own template (not ``--chat-template``).
    """
    if isinstance(tokenizer, (str, Path)):
        target = target if target is not None else tokenizer
        tokenizer = load_tokenizer(tokenizer, trust_remote_code)
    target = target if target is not None else getattr(tokenizer, "name_or_path", "the target")
    rec = manifest.get("tokenizer") or {}
    have = tokenizer_fingerprint(tokenizer)
    diffs = []
    if rec.get("vocab_sha256") and rec["vocab_sha256"] != have["vocab_sha256"]:
        diffs.append(f"vocabulary sha256 {rec['vocab_sha256'][:12]}… vs {have['vocab_sha256'][:12]}…")
    if rec.get("len") is not None and int(rec["len"]) != have["len"]:
        diffs.append(f"tokenizer length {rec['len']} vs {have['len']}")
    if rec.get("class") and rec["class"] != have["class"]:
        diffs.append(f"tokenizer class {rec['class']} vs {have['class']}")
    recorded_tpl = manifest.get("chat_template_sha256")
    if recorded_tpl and manifest.get("chat_template_source", "tokenizer") == "tokenizer":
        tpl = getattr(tokenizer, "chat_template", None)
        tpl = tpl.get("default") if isinstance(tpl, dict) else tpl
        if not tpl:
            diffs.append("chat template: the target's tokenizer has none")
        elif sha256_text(tpl) != recorded_tpl:
            diffs.append(f"chat template sha256 {recorded_tpl[:12]}… vs {sha256_text(tpl)[:12]}…")
    if diffs:
        raise DataError(f"{dataset} was prepared for another tokenizer than {target}'s ({'; '.join(diffs)}); "
                        "prepare the data again with this target")


@dataclass
class PreparedData:
    """A ``prepare`` output loaded back: dataset rows (input_ids, loss_mask), manifest, counts."""

    path: Path
    dataset: Any  # datasets.Dataset
    manifest: dict[str, Any]
    supervised_counts: Tensor  # int64 [V]
    all_counts: Tensor  # int64 [V]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.dataset[int(i)]

    @property
    def draft_choice(self) -> dict[str, Any]:
        """The draft vocabulary and mask token ``prepare`` chose (``draft_vocab_size``,
        ``mask_token_id``, ``coverage``, ``vocab_size``): the manifest's ``draft_vocab`` record, {} if
        the dataset has none."""
        return dict(self.manifest.get("draft_vocab") or {})

    def draft_vocab(self, size: int | None = None) -> DraftVocab:
        """The ``size`` most frequent supervised tokens (default: the size prepare chose), by the same
        `build_draft_vocab` prepare used, so training gets exactly the vocabulary prepare recorded."""
        vocab_size = int(self.manifest.get("vocab_size") or self.supervised_counts.numel())
        counts = torch.nn.functional.pad(self.supervised_counts[:vocab_size],
                                         (0, max(0, vocab_size - self.supervised_counts.numel())))
        return build_draft_vocab(counts, size or self.draft_choice.get("draft_vocab_size") or vocab_size)

    @property
    def lengths(self) -> list[int]:
        """Token count of every example (for packing), without decoding the id lists."""
        import pyarrow.compute as pc

        col = self.dataset.data.column("input_ids")
        return pc.list_value_length(col).to_pylist()

    def record_groups(self) -> list[list[int]]:
        """Example indices grouped by the chat they came from (first-seen order): a chat whose template
        rewrites history gives several examples, which must land on the same side of a train/val split.
        Datasets without the ``record`` column: one group per example."""
        if "record" not in self.dataset.column_names:
            return [[i] for i in range(len(self))]
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(self.dataset.data.column("record").to_pylist()):
            groups.setdefault(int(r), []).append(i)
        return list(groups.values())


def load_prepared(path: str | Path) -> PreparedData:
    """Load a ``prepare`` output directory (clear DataError if it is not one)."""
    from datasets import load_from_disk
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / MANIFEST).exists() or not (path / DATASET_SUBDIR).exists():
        raise DataError(
            f"{path} is not a prepared dataset (no {MANIFEST} / {DATASET_SUBDIR}/); run peagle prepare first"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        counts = load_file(str(path / TOKEN_COUNTS))
        ds = load_from_disk(str(path / DATASET_SUBDIR))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: a damaged prepared dataset ({first}); run peagle prepare again") from None
    return PreparedData(path, ds, manifest, counts["supervised"], counts["all"])
