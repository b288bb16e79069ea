"""Chat / text / token-id data → token ids + loss mask → a prepared dataset → packed rows → the EAGLE shift.

The stages, one module each (docs/conventions.md, docs/internals.md)::

    files ──records──▶ Record ──templates──▶ TokenizedExample ──preparation──▶ prepared dir
    (jsonl/json/        (chat: OpenAI messages; (ids + assistant mask,  (dataset/, manifest.json,
     parquet/datasets)   or text, or token ids)  serving form per turn;  token_counts, draft vocab)
                                                 text: ids + all ones)
                                                                                 │ prepared
    Batch ◀──shift────  PackedRows ◀──packing── PreparedData ◀────────────────────┘
    (element j = x[j+1], g[j])  (rows of max_length, document ids, COD seeds)

- ``records``: :func:`read_records`, :func:`normalize_record` (kinds CHAT, TEXT, TOKENS); bad records
  are :class:`RecordError` naming file:line (``chat``: OpenAI content forms → what templates read).
- ``templates``: :func:`tokenize_chat_examples` supervises each assistant turn as generated at
  serving time (``one_rendering`` / ``per_turn``), spans from ``{% generation %}`` or prefix rendering.
- ``text``: :func:`tokenize_record` for plain text (:func:`encode_text`, every token supervised) and
  token ids (:func:`check_token_ids`), split at max_length (:func:`split_example`); no chat template.
- ``preparation``: :func:`prepare`, the ``peagle prepare`` core, one atomic directory.
- ``prepared``: :func:`load_prepared` → :class:`PreparedData` (``draft_choice``: the draft vocabulary
  and mask token prepare chose), :func:`check_dataset_matches_target`.
- ``packing``: :func:`pack` (first-fit), :func:`collate`, :func:`cod_seeds`.
- ``shift``: :func:`eagle_shift`, the one place the EAGLE shift happens.
"""

from peagle.data.packing import PackedRows, cod_seed, cod_seeds, collate, pack, positions_in_document
from peagle.data.preparation import ON_ERROR_CHOICES, SKIP_HINT, prepare
from peagle.data.prepared import (
    DATASET_SUBDIR,
    FORMAT,
    MANIFEST,
    TOKEN_COUNTS,
    PreparedData,
    check_dataset_matches_target,
    load_prepared,
    tokenizer_fingerprint,
)
from peagle.data.records import (
    BAD_RECORD,
    BAD_TOKENS,
    CHAT,
    MALFORMED_JSON,
    NOT_UTF8,
    OPENAI_ROLE_ALIASES,
    OPENAI_ROLES,
    RECORD_KINDS,
    SHAREGPT_ROLES,
    TEXT,
    TOKENS,
    UNKNOWN_ROLE,
    UNWANTED_KIND,
    DataError,
    Record,
    RecordError,
    SplitSpec,
    normalize_record,
    read_records,
)
from peagle.data.shift import Batch, eagle_shift, shift_states
from peagle.data.summary import PrepareSummary
from peagle.data.templates import (
    GENERATION_FULL,
    NO_ASSISTANT,
    NO_SUPERVISED,
    ONE_RENDERING,
    PER_TURN,
    PROMPT_TOO_LONG,
    TEMPLATE_ERROR,
    TEMPLATE_NOT_INCREMENTAL,
    TOO_LONG,
    ChatTokenization,
    TokenizedExample,
    load_chat_template,
    resolve_chat_template,
    tokenize_chat,
    tokenize_chat_examples,
)
from peagle.data.text import check_token_ids, encode_text, split_example, tokenize_record

__all__ = [
    "BAD_RECORD",
    "BAD_TOKENS",
    "CHAT",
    "DATASET_SUBDIR",
    "FORMAT",
    "GENERATION_FULL",
    "MALFORMED_JSON",
    "MANIFEST",
    "NOT_UTF8",
    "NO_ASSISTANT",
    "NO_SUPERVISED",
    "ONE_RENDERING",
    "ON_ERROR_CHOICES",
    "OPENAI_ROLES",
    "OPENAI_ROLE_ALIASES",
    "PER_TURN",
    "PROMPT_TOO_LONG",
    "RECORD_KINDS",
    "SHAREGPT_ROLES",
    "SKIP_HINT",
    "TEMPLATE_ERROR",
    "TEMPLATE_NOT_INCREMENTAL",
    "TEXT",
    "TOKENS",
    "TOKEN_COUNTS",
    "TOO_LONG",
    "UNKNOWN_ROLE",
    "UNWANTED_KIND",
    "ChatTokenization",
    "DataError",
    "PackedRows",
    "PrepareSummary",
    "PreparedData",
    "Record",
    "RecordError",
    "Batch",
    "SplitSpec",
    "TokenizedExample",
    "check_dataset_matches_target",
    "check_token_ids",
    "cod_seed",
    "cod_seeds",
    "collate",
    "eagle_shift",
    "encode_text",
    "shift_states",
    "split_example",
    "load_chat_template",
    "load_prepared",
    "normalize_record",
    "pack",
    "positions_in_document",
    "prepare",
    "read_records",
    "resolve_chat_template",
    "tokenize_chat",
    "tokenize_chat_examples",
    "tokenize_record",
    "tokenizer_fingerprint",
]
