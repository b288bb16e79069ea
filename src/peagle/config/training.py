"""Training configuration: dataclasses loaded from YAML plus ``--section.key value`` overrides.

A config has four sections (``data``, ``model``, ``optim``, ``train``) and an optional ``eval``
section. Everything is validated before any heavy work starts: unknown keys (with the file they
came from and the closest valid key), wrong types and out-of-range values all raise a one-line
:class:`ConfigError`. Range limits shared with the library come from `peagle.config.limits`.

Example::

    data:  {dataset: runs/prepared, max_length: 2048}
    model: {target: /models/Llama-3.1-8B-Instruct, target_name: meta-llama/Llama-3.1-8B-Instruct}
    optim: {lr: 1.5e-3, warmup_steps: 100}
    train: {output_dir: runs/llama-peagle, micro_batch_size: 2, grad_accum: 4, epochs: 2}

    $ peagle train config.yaml --optim.lr 1e-4 --train.max_steps 500

Why hand-written and not draccus/tyro (torchtitan's choice): both build the dataclasses from YAML and
``--section.key`` flags well, but neither reports a bad value with the YAML *line* it came from plus a
"did you mean" for a misspelt key in one line (draccus raises a multi-line parsing traceback, tyro
prints a usage block), and users of this trainer edit long YAML files. What is left here is only that:
a type coercion per annotation, the range limits declared on each field, and the messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from peagle.config.limits import LIMITS, out_of_range, validate_mask_token_id

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "Config",
    "load_config",
    "parse_overrides",
    "config_from_dict",
    "config_to_dict",
    "all_keys",
    "did_you_mean",
    "states_source",
]


class ConfigError(ValueError):
    """A user error in a config file or a command-line override (one line, no traceback)."""


def _f(default: Any = dataclasses.MISSING, *, help: str = "", **limits: Any) -> Any:
    """A dataclass field with a help string and range limits (``ge``, ``gt``, ``le``, ``lt``)."""
    meta = {"help": help, **limits}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where the training examples come from and how they are packed."""

    dataset: str = _f(help="tokenized dataset directory written by `peagle prepare --out`")
    cache: str | None = _f(None, help="offline target-state cache (`peagle prepare --cache`); null = online")
    states: Literal["auto", "online", "cache", "stream"] = _f(
        "auto", help="where the target states come from: online (the in-process HF target), cache (data.cache), "
        "stream (vLLM while training: data.stream_*); auto = cache when data.cache is set, else online")
    stream_servers: list[str] | None = _f(
        None, help="data.states stream: URLs of vLLM servers started with the extraction method and the "
        "hidden-states connector (docs/large-targets.md); null = an in-process vLLM engine per rank")
    stream_prefetch: int = _f(2, ge=1, help="data.states stream: optimizer steps of states requested ahead "
                              "(the staging area holds at most this many steps of this rank's micro-batches)")
    stream_retries: int = _f(3, ge=0, help="data.states stream: retries of a failed request (backoff 1, 2, 4 … s) "
                             "before the run saves a checkpoint and stops")
    stream_timeout: float = _f(600.0, gt=0.0, help="data.states stream: seconds one request may take before it "
                               "counts as stalled (and is retried)")
    stream_concurrency: int = _f(32, ge=1, help="data.states stream with servers: requests in flight per rank")
    stream_tensor_parallel_size: int = _f(1, ge=1, help="data.states stream, in-process engine: vLLM's "
                                          "tensor_parallel_size")
    stream_gpu_memory_utilization: float = _f(
        0.5, gt=0.0, le=1.0, help="data.states stream, in-process engine on a GPU: the share of its memory vLLM "
        "may take (the rest is the trainer's)")
    max_length: int = _f(2048, ge=8, help="row length (tokens) examples are packed into")
    val_fraction: float = _f(0.0, ge=0.0, lt=1.0, help="fraction of examples held out for validation")
    shuffle: bool = _f(True, help="shuffle examples every epoch (seeded by train.seed and the epoch)")


@dataclass
class ModelConfig:
    """The target and the draft architecture / P-EAGLE sampling."""

    target: str = _f(help="local Hugging Face causal LM directory (the target / verifier)")
    target_name: str | None = _f(None, help="verifier name_or_path written into the export (default: target)")
    trust_remote_code: bool = _f(False, help="pass trust_remote_code to from_pretrained")
    target_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", help="target weights dtype: auto = bf16 on CUDA, fp32 on CPU"
    )
    aux_layer_ids: list[int] | None = _f(None, help="target layers whose inputs are the aux states")
    num_layers: int = _f(4, ge=1, help="draft decoder layers (DraftConfig.num_hidden_layers)")
    num_depths: int = _f(8, **LIMITS["num_depths"], help="K: tokens drafted in parallel (COD depths)")
    ratio: float = _f(0.7, **LIMITS["ratio"], help="COD down-sampling ratio r")
    ratio_min: float = _f(0.2, **LIMITS["ratio_min"], help="COD ratio floor r_min")
    max_anchors: int | None = _f(None, **LIMITS["max_anchors"],
                                 help="cap on supervised chain starts per document (null = off)")
    loss_normalization: Literal["elements", "depths"] = _f(
        "elements", help="how the step's KL sum is averaged: elements (over every supervised element, as "
        "speculators and NeMo) or depths (each depth's mean weighs 1/K); docs/conventions.md, 'Loss'")
    draft_vocab_size: int | None = _f(None, ge=1, help="null = the vocabulary chosen by `peagle prepare`")
    mask_token_id: int | Literal["auto"] = _f("auto", help="'auto' = the id chosen by `peagle prepare`")
    norm_before_residual: bool = _f(False)
    norm_before_fc: bool = _f(False)
    fc_norm: bool = _f(False)
    norm_output: bool = _f(False)
    init_embed_from_target: bool = _f(True, help="start embed_tokens from the target's input embedding")
    init_lm_head_from_target: bool = _f(True, help="initialise lm_head from the target's draft-vocab rows "
                                        "(trained unless freeze_lm_head; docs/training.md, 'Defaults')")
    freeze_lm_head: bool = _f(False, help="keep lm_head fixed (use with init_lm_head_from_target)")
    activation_checkpointing: bool = _f(False, help="recompute draft layers in backward")
    sequence_partitions: int = _f(1, **LIMITS["sequence_partitions"],
                                  help="S segments per row (bounds activation memory; exact)")


@dataclass
class OptimConfig:
    """AdamW and the warmup + cosine schedule."""

    lr: float = _f(1.5e-3, gt=0.0, help="peak learning rate (docs/training.md, 'Defaults')")
    betas: list[float] = _f([0.9, 0.95], help="AdamW betas")
    eps: float = _f(1.0e-8, gt=0.0)
    weight_decay: float = _f(0.0, ge=0.0)
    warmup_steps: int = _f(15, ge=0, help="linear warmup steps")
    min_lr_ratio: float = _f(0.1, ge=0.0, le=1.0, help="cosine floor as a fraction of lr")
    grad_clip: float | None = _f(1.0, gt=0.0, help="max global grad norm (null = no clipping)")


@dataclass
class TrainConfig:
    """The loop: batch geometry, duration, checkpoints, logging."""

    output_dir: str = _f(help="where checkpoints, metrics and the export go")
    micro_batch_size: int = _f(1, ge=1, help="rows per forward")
    grad_accum: int = _f(1, ge=1, help="micro-batches per optimizer step (per rank)")
    epochs: int = _f(1, ge=1)
    max_steps: int | None = _f(None, ge=1, help="optimizer steps (overrides epochs)")
    seed: int = _f(0, ge=0)
    save_every: int = _f(500, ge=0, help="checkpoint every N steps (0 = only at the end)")
    keep_last: int = _f(3, ge=1, help="checkpoints kept")
    eval_every: int = _f(0, ge=0, help="validation (+ acceptance length) every N steps (0 = at the end only)")
    log_every: int = _f(1, ge=1)
    dtype: Literal["auto", "bf16", "fp32"] = _f(
        "auto", help="autocast dtype (fp32 master weights): auto = bf16 on CUDA; on a CPU bf16 where its bf16 "
        "matmuls measure >= 1.5x fp32 (AMX, AVX-512 BF16), else fp32; a resumed run keeps its choice")
    device: Literal["auto", "cpu", "cuda"] = _f("auto")
    parallel: Literal["ddp", "fsdp"] = _f(
        "ddp", help="data parallelism under torchrun: ddp (every rank holds the whole draft, gradients summed) "
        "or fsdp (FSDP2: weights, gradients and AdamW state sharded over the ranks, per draft layer + the rest)")
    tensorboard: bool = _f(True)
    progress: bool = _f(True, help="show a progress bar")
    on_nonfinite: Literal["stop", "skip"] = _f(
        "stop", help="non-finite loss or gradient: stop before saving (stop) or skip the update (skip)"
    )


@dataclass
class EvalConfig:
    """Acceptance-length evaluation during training (``peagle.eval``)."""

    enabled: bool = _f(True, help="measure acceptance length at each validation")
    prompts: str | None = _f(None, help="JSONL prompts for AL; null = the prompts of validation examples")
    num_prompts: int = _f(8, ge=1)
    max_new_tokens: int = _f(64, ge=1)


@dataclass
class Config:
    """The whole run configuration."""

    data: DataConfig
    model: ModelConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir=""))
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def all_keys() -> list[str]:
    """Every valid dotted key (``section.name``)."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def did_you_mean(key: str) -> str:
    """`` (did you mean 'x'?)`` for the closest valid key, or an empty string."""
    keys = all_keys()
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
    if leaf in leaves:  # the right name in the wrong section (or without its section)
        return f" (did you mean '{leaves[leaf]}'?)"
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not match:
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.7)
        match = [leaves[close[0]]] if close else []
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to ``tp`` when it is a valid instance, else ``_NO``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg)
            if out is not _NO:
                return out
        return _NO
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in typing.get_args(tp)) else _NO
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _NO
        (arg,) = typing.get_args(tp)
        items = [_coerce(v, arg) for v in value]
        return _NO if any(v is _NO for v in items) else items
    if tp is type(None):
        return None if value is None else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    return _NO


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any], where: str) -> None:
    if value is None or isinstance(value, (str, bool)):
        return
    why = out_of_range(value, meta)
    if why is not None:
        raise ConfigError(f"{where}: {key} = {value!r} is out of range ({why})")


def _build_section(name: str, values: dict[str, Any], where: dict[str, str]) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{name}.{f.name}"
        if f.name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                hint = f" (set it in the config file or with --{key} VALUE)"
                raise ConfigError(f"missing required key '{key}'{hint}")
            continue
        src = where.get(key, "config")
        raw = values[f.name]
        value = _coerce(raw, hints[f.name])
        if value is _NO:
            raise ConfigError(f"{src}: {key} must be {_type_name(hints[f.name])}, got {type(raw).__name__} {raw!r}")
        _check_range(key, value, f.metadata, src)
        kwargs[f.name] = value
    return cls(**kwargs)


def _cross_checks(cfg: Config) -> None:
    m, o = cfg.model, cfg.optim
    if m.ratio_min > m.ratio:
        raise ConfigError(f"model.ratio_min ({m.ratio_min}) must not exceed model.ratio ({m.ratio})")
    if m.mask_token_id != "auto":
        try:
            validate_mask_token_id(m.mask_token_id)
        except ValueError as e:
            raise ConfigError(f"model.{e} or 'auto'") from None
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas = {o.betas} must be two numbers in [0, 1)")
    if m.freeze_lm_head and not m.init_lm_head_from_target:
        raise ConfigError("model.freeze_lm_head needs model.init_lm_head_from_target: true (else lm_head stays random)")
    if m.aux_layer_ids is not None and (len(set(m.aux_layer_ids)) != 3 or min(m.aux_layer_ids) < 0):
        raise ConfigError(f"model.aux_layer_ids = {m.aux_layer_ids} must be three distinct non-negative layer ids "
                          "(vLLM collapses repeated ids)")
    if not cfg.train.output_dir:
        raise ConfigError("missing required key 'train.output_dir'")
    _check_states(cfg.data)


def states_source(d: DataConfig) -> str:
    """Where the target states come from: "online", "cache" or "stream" (``data.states``, auto resolved)."""
    if d.states == "auto":
        return "cache" if d.cache is not None else "online"
    return d.states


def _check_states(d: DataConfig) -> None:
    """``data.states`` against ``data.cache`` and the ``data.stream_*`` keys."""
    source = states_source(d)
    if source == "cache" and d.cache is None:
        raise ConfigError("data.states cache needs data.cache (the directory `peagle prepare --cache` wrote)")
    if source != "cache" and d.cache is not None:
        raise ConfigError(f"data.cache is set but data.states is {d.states}: the cache is only read with "
                          "data.states cache (or auto); drop data.cache or set data.states cache")
    if d.stream_servers is not None and source != "stream":
        raise ConfigError(f"data.stream_servers is set but data.states is {d.states}: servers are only asked "
                          "with data.states stream")
    if d.stream_servers is not None:
        if not d.stream_servers:
            raise ConfigError("data.stream_servers is empty: give server URLs, or null for an in-process engine")
        bad = [u for u in d.stream_servers if not u.startswith(("http://", "https://"))]
        if bad:
            raise ConfigError(f"data.stream_servers: {bad[0]!r} is not an http:// or https:// URL")
        if d.stream_tensor_parallel_size != 1:
            raise ConfigError("data.stream_tensor_parallel_size is for the in-process engine; a server's tensor "
                              "parallelism is set when it starts (--tensor-parallel-size)")


def config_from_dict(raw: Any, source: str = "config", where: dict[str, str] | None = None) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (as read from YAML)."""
    where = where or {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    sections: dict[str, dict[str, Any]] = {}
    for sec, body in raw.items():
        if sec not in SECTIONS:
            raise ConfigError(f"{where.get(str(sec), source)}: unknown section '{sec}'{did_you_mean(str(sec))}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section '{sec}' must be a mapping, got {type(body).__name__}")
        valid = {f.name for f in dataclasses.fields(SECTIONS[sec])}
        for key in body:
            if key not in valid:
                dotted = f"{sec}.{key}"
                raise ConfigError(f"{where.get(dotted, source)}: unknown key '{dotted}'{did_you_mean(dotted)}")
        sections[sec] = dict(body)
    built = {name: _build_section(name, sections.get(name, {}), where) for name in SECTIONS}
    cfg = Config(**built)
    _cross_checks(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain nested dict (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``["--optim.lr", "1e-4", "--train.seed=3"]`` -> ``[("optim.lr", 1e-4), ("train.seed", 3)]``.

    Values are parsed with ``yaml.safe_load`` (so ``null``, ``true``, ``[1, 2]`` work).
    """
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"command line: expected --section.key VALUE, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: --{key} needs a value")
            i += 1
            text = args[i]
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if "." not in key:
            raise ConfigError(f"command line: unknown option '--{key}'{did_you_mean(key)}")
        out.append((key, value))
        i += 1
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (YAML), apply ``--section.key value`` overrides, validate; raise :class:`ConfigError`."""
    raw: dict[str, Any] = {}
    source = "command line"
    where: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{p}:{line}: invalid YAML ({problem})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        raw = loaded or {}
        for sec, body in raw.items():
            where[str(sec)] = source
            if isinstance(body, dict):
                for key in body:
                    where[f"{sec}.{key}"] = source
    valid = set(all_keys())
    for key, value in parse_overrides(overrides or []):
        if key not in valid:
            raise ConfigError(f"command line: unknown option '--{key}'{did_you_mean(key)}")
        sec, name = key.split(".", 1)
        if not isinstance(raw.get(sec), dict):
            raw[sec] = {}
        raw[sec][name] = value
        where[key] = f"command line (--{key})"
    return config_from_dict(raw, source, where)
