"""Building a training run: every check before heavy work, then what the loop holds (`Run`).

`build(cfg)` checks the config against the output directory, the checkpoint to resume, the dataset
and the target (cheap checks first: nothing heavy runs on a config that will be refused), then builds
the data loader, the target (whole, or only its embeddings/norm/lm_head when states come from a
cache), the draft — whose `DraftConfig`, built from the target's config.json, is the one place that
validates the mask token, the vocabulary sizes and K —, the trainer (under torchrun DDP-wrapped or
FSDP2-sharded: ``train.parallel``), AdamW and its schedule, and the resumed state (docs/training.md).
A checkpoint's weights are loaded into the whole draft before it is sharded; its AdamW state after.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer

from peagle.config.training import Config, ConfigError, config_to_dict, states_source
from peagle.data.prepared import PreparedData, check_dataset_matches_target, load_prepared
from peagle.data.records import DataError
from peagle.data.vocab import DraftVocab, check_mask_token
from peagle.eval.continuations import ContinuationSet
from peagle.model.config import DraftConfig, resolve_aux_layer_ids
from peagle.model.draft import PEagleDraft
from peagle.model.step import PEagleTrainer
from peagle.run.distributed import Dist, all_reduce, full_draft, init_distributed, load_optimizer_state, wrap
from peagle.run.loader import TrainData
from peagle.run.optim import apply_optim_config, build_optimizer, lr_factor
from peagle.run.resume import check_resume_vocab, resume_changes
from peagle.run.runlog import RunLogger
from peagle.store.checkpoint import (
    TrainState,
    list_checkpoints,
    load_checkpoint,
    load_config_dict,
    read_optimizer_state,
    resolve_resume,
    restore_rng,
)
from peagle.store.rundir import check_run_dir
from peagle.target.cache import CachedStates, CacheError
from peagle.target.hf import Target, TargetError, TargetParts, target_shape, verifier_fingerprint
from peagle.target.stream import Extractor, StreamedStates
from peagle.util.machine import BF16_MIN_SPEEDUP, bf16_speedup

__all__ = ["Run", "build"]


@dataclass
class Run:
    """Everything one training run holds: built once by `build`, read by the step, the validator and the saver."""

    cfg: Config
    d: Dist
    out: Path
    data: TrainData
    draft: PEagleDraft
    trainer: PEagleTrainer
    model: nn.Module            # the trainer; under torchrun DDP-wrapped or FSDP2-sharded (train.parallel)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainState
    total: int
    source: Any                 # what gives target states: the Target (online), CachedStates (cache) or
                                # StreamedStates (stream: asked from vLLM ahead of the loop, `source.streamed`)
    target: Any | None          # the Target when acceptance lengths are measured during training
    al_prompts: list[dict[str, Any]] | None
    logger: RunLogger
    autocast_bf16: bool
    last_saved: int = -1
    continuations: ContinuationSet | None = None

    @property
    def params(self) -> list[Tensor]:
        return [p for p in self.draft.parameters() if p.requires_grad]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16)

    def full_draft(self) -> PEagleDraft | None:
        """The whole draft on rank 0 (None on the others); under FSDP a gathered copy: every rank must call it."""
        return full_draft(self.model, self.draft, self.d)

    def newest_checkpoint(self) -> Path | None:
        existing = list_checkpoints(self.out)
        return existing[-1][1] if existing else None




def build(cfg: Config, resume: str | None = None, accepted: set[str] | frozenset[str] = frozenset()) -> Run:
    """Check the config against the dataset, target and checkpoint (cheap checks first), then build the run:
    data, draft, trainer (DDP-wrapped or FSDP2-sharded under torchrun), optimizer, schedule, resumed state."""
    out = Path(cfg.train.output_dir)
    ckpt, applied = _resume_point(cfg, out, resume, accepted)
    prepared, vocab_size, num_layers = _load_dataset(cfg)
    dcfg, vocab = _draft_config(cfg, prepared, vocab_size, num_layers)
    if ckpt is not None:
        check_resume_vocab(ckpt, vocab, dcfg.mask_token_id, cfg)
    cache = _open_cache(cfg, prepared, tuple(dcfg.aux_layer_ids))
    streamed = states_source(cfg.data) == "stream"
    if streamed:
        _check_stream(cfg)

    d = init_distributed(cfg.train.device)
    rows_per_step = d.world * cfg.train.grad_accum * cfg.train.micro_batch_size
    data = TrainData(cfg, prepared, rows_per_step)
    al_prompts = (cfg.eval.prompts or data.heldout_prompts(cfg.eval.num_prompts)) if cfg.eval.enabled else None
    target = _load_target(cfg, d, need_decoder=bool(al_prompts) or states_source(cfg.data) == "online")
    draft = _build_draft(cfg, dcfg, vocab, target).to(d.device)
    m = cfg.model
    trainer = PEagleTrainer(draft, ratio=m.ratio, ratio_min=m.ratio_min, max_anchors=m.max_anchors,
                            sequence_partitions=m.sequence_partitions,
                            target_head=target.head(vocab.t2d).to(d.device))
    if cache is not None and d.device.type == "cpu":
        cache.dtype = torch.float32  # bf16 on disk; fp32 inputs on CPU (autocast casts where train.dtype is bf16)
    total = cfg.train.max_steps or sum(data.steps_in_epoch(e) for e in range(cfg.train.epochs))
    state, rngs = TrainState(rows_per_step=rows_per_step, world_size=d.world), None
    if ckpt is not None:  # the weights, into the whole draft (sharded below)
        state, rngs = load_checkpoint(ckpt, model=draft, verify=False)
    state.autocast_dtype, why = _autocast_dtype(cfg.train.dtype, d, state.autocast_dtype)
    bf16 = state.autocast_dtype == "bf16"
    bf16_params = bf16 and d.device.type == "cuda"  # FSDP2's mixed-precision policy (CUDA only)
    model = wrap(trainer, d, cfg.train.parallel, bf16_params=bf16_params)
    optimizer, scheduler = build_optimizer(draft, cfg.optim, total)  # over the parameters as wrapped (shards)
    next_lr = None
    if ckpt is not None:
        next_lr = _restore(ckpt, state, rngs, model, draft, optimizer, scheduler, cfg, d, total)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    logger = RunLogger(cfg, out, total, state.step, d.main)
    source: Any = cache if cache is not None else target
    if streamed:  # last: nothing after it can refuse the run while an engine runs
        try:
            source = _open_stream(cfg, d, data, state, total, tuple(dcfg.aux_layer_ids), logger)
        except BaseException:
            logger.close()
            raise
    if ckpt is not None:
        _log_resume(logger, cfg, ckpt, state, applied, next_lr, total)
    logger.write(f"train.dtype {cfg.train.dtype}: {state.autocast_dtype} ({why})")
    if d.active:
        logger.write(_describe_parallel(cfg.train.parallel, d, bf16_params))
    return Run(cfg=cfg, d=d, out=out, data=data, draft=draft, trainer=trainer, model=model,
               optimizer=optimizer, scheduler=scheduler, state=state, total=total,
               source=source, target=target if al_prompts else None,
               al_prompts=al_prompts, logger=logger, last_saved=state.step if ckpt is not None else -1,
               autocast_bf16=bf16)


def _describe_parallel(parallel: str, d: Dist, bf16_params: bool) -> str:
    """The log line naming the data parallelism in use."""
    if parallel == "ddp":
        return f"train.parallel ddp: {d.world} ranks, each holding the whole draft, gradients summed"
    precision = "bf16 compute weights, fp32 gradient reduction" if bf16_params else "fp32"
    return (f"train.parallel fsdp: FSDP2 over {d.world} ranks (one group per draft layer + the root), weights, "
            f"gradients and AdamW state sharded, gradients summed; {precision}; fp32 master weights")


def _resume_point(cfg: Config, out: Path, resume: str | None, accepted: set[str] | frozenset[str]
                  ) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume (None: a fresh run) and the config changes it applies (refused ones raise)."""
    ckpt = resolve_resume(resume, out) if resume else None
    if resume is None and list_checkpoints(out):
        raise ConfigError(f"train.output_dir {out} already holds checkpoints; pass --resume auto to continue, "
                          "or choose another output directory")
    try:
        check_run_dir(out, has_checkpoints=bool(list_checkpoints(out)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if ckpt is None:
        if accepted:
            print("note: --accept-change has no effect: there is no checkpoint to resume (a fresh run)", flush=True)
        return None, []
    step = int(json.loads((ckpt / "trainer_state.json").read_text()).get("step", 0))
    return ckpt, resume_changes(load_config_dict(ckpt), cfg, accepted, ckpt, step)


def _restore(ckpt: Path, state: TrainState, rngs: list[dict[str, Any]], model: nn.Module, draft: PEagleDraft,
             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: Config, d: Dist,
             total: int) -> float:
    """Load the checkpoint's AdamW state (the weights are in already), its schedule and this rank's RNG;
    apply this config's optimisation from its step and this run's batch geometry; returns the next lr."""
    load_optimizer_state(model, draft, optimizer, d, lambda: read_optimizer_state(ckpt))
    scheduler.load_state_dict(state.scheduler)
    next_lr = apply_optim_config(optimizer, scheduler, cfg.optim, state.step, total)
    restore_rng(rngs[d.rank] if d.rank < len(rngs) else rngs[0])
    rows_per_step = d.world * cfg.train.grad_accum * cfg.train.micro_batch_size
    if state.rows_per_step != rows_per_step:
        state.row_in_epoch = (state.row_in_epoch // rows_per_step) * rows_per_step
    state.rows_per_step, state.world_size = rows_per_step, d.world
    return next_lr


def _log_resume(logger: RunLogger, cfg: Config, ckpt: Path, state: TrainState, applied: list[str],
                next_lr: float | None, total: int) -> None:
    logger.write(f"resumed from {ckpt} at step {state.step} (epoch {state.epoch})")
    for change in applied:
        logger.write(f"config change applied from step {state.step + 1}: {change}")
    if applied:
        o = cfg.optim
        logger.write(f"lr of step {state.step + 1}: {next_lr:.6g} (optim.lr {o.lr:g} × schedule factor "
                     f"{lr_factor(state.step, total, o.warmup_steps, o.min_lr_ratio):.4g}, {total} steps in all)")


def _autocast_dtype(name: str, d: Dist, resumed: str) -> tuple[str, str]:
    """What ``train.dtype`` trains in ("bf16" | "fp32") and why. ``auto``: bf16 on CUDA; on a CPU bf16 only
    where its bf16 matmuls are measured `BF16_MIN_SPEEDUP` times faster than fp32 (rank 0 measures, every
    rank follows); a resumed run keeps what it started with, so ``auto`` never flips mid-run."""
    if name != "auto":
        return name, "as configured"
    if resumed:
        return resumed, "as when the run started"
    if d.device.type == "cuda":
        return "bf16", "CUDA"
    speedup = float(all_reduce(torch.tensor([bf16_speedup() if d.main else 0.0], dtype=torch.float64), d).item())
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"bf16 matmul measured {speedup:.1f}x fp32 on this CPU"
    return "fp32", f"bf16 matmul measured {speedup:.1f}x fp32 on this CPU, under {BF16_MIN_SPEEDUP}x"


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _load_dataset(cfg: Config) -> tuple[PreparedData, int, int]:
    """The prepared dataset, checked against this target (vocabulary size, tokenizer, chat template), and
    the target's (vocab size, layers) read once from its config.json."""
    try:
        prepared = load_prepared(cfg.data.dataset)
        vocab_size, num_layers = target_shape(cfg.model.target, cfg.model.trust_remote_code)
    except (DataError, TargetError) as e:
        raise ConfigError(f"{'model.target' if isinstance(e, TargetError) else 'data.dataset'}: {e}") from None
    prepared_vocab = prepared.manifest.get("vocab_size")
    if prepared_vocab is not None and int(prepared_vocab) != vocab_size:
        raise ConfigError(
            f"data.dataset {cfg.data.dataset} was prepared for a vocabulary of {prepared_vocab} tokens, but "
            f"model.target {cfg.model.target} has {vocab_size}: prepare it with this target")
    try:
        check_dataset_matches_target(prepared.manifest, cfg.model.target, dataset=cfg.data.dataset,
                                     trust_remote_code=cfg.model.trust_remote_code)
    except DataError as e:
        raise ConfigError(f"data.dataset: {e}") from None
    return prepared, vocab_size, num_layers


def _draft_config(cfg: Config, prepared: PreparedData, vocab_size: int, num_layers: int
                  ) -> tuple[DraftConfig, DraftVocab]:
    """The draft's config (from the target's config.json alone) and vocabulary: the draft vocab size and
    mask token recorded by ``peagle prepare`` unless the config overrides them. DraftConfig validates."""
    m = cfg.model
    choice = prepared.draft_choice
    try:
        aux = resolve_aux_layer_ids(m.aux_layer_ids, num_layers)
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    hf_config = AutoConfig.from_pretrained(m.target, trust_remote_code=m.trust_remote_code)
    size = m.draft_vocab_size or choice.get("draft_vocab_size") or vocab_size
    mask = m.mask_token_id if m.mask_token_id != "auto" else choice.get("mask_token_id")
    if mask is None:
        raise ConfigError(f"model.mask_token_id: auto, but data.dataset {cfg.data.dataset} records no mask "
                          "token (prepared by an older peagle?): prepare it again, or set an id")
    try:
        if m.mask_token_id != "auto":  # an explicit id must never occur in the data
            check_mask_token(int(mask), vocab_size, prepared.all_counts)
        dcfg = DraftConfig.from_target(
            hf_config, mask_token_id=int(mask), num_hidden_layers=m.num_layers, draft_vocab_size=size,
            norm_before_residual=m.norm_before_residual, norm_before_fc=m.norm_before_fc, fc_norm=m.fc_norm,
            norm_output=m.norm_output, aux_layer_ids=list(aux), num_speculative_tokens=m.num_depths,
            verifier_name_or_path=m.target_name or str(Path(m.target).resolve()),  # a path vLLM can open
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    return dcfg, prepared.draft_vocab(dcfg.draft_vocab_size)


def _open_cache(cfg: Config, prepared: PreparedData, aux: tuple[int, ...]) -> CachedStates | None:
    """The offline state cache (None when online), checked against the dataset and the draft's aux layers."""
    if cfg.data.cache is None:
        return None
    try:
        cache = CachedStates(cfg.data.cache)
    except CacheError as e:
        raise ConfigError(f"data.cache: {e}") from None
    if len(cache) != len(prepared) or tuple(cache.aux_layer_ids) != aux:
        raise ConfigError(
            f"data.cache {cfg.data.cache} was built for another dataset or target ({len(cache)} examples, "
            f"aux layers {list(cache.aux_layer_ids)}; expected {len(prepared)}, {list(aux)})"
        )
    return cache


def _check_stream(cfg: Config) -> None:
    """``data.states: stream`` can run here: an in-process engine needs vLLM installed."""
    import importlib.util

    if cfg.data.stream_servers is None and importlib.util.find_spec("vllm") is None:
        raise ConfigError("data.states stream without data.stream_servers runs vLLM in-process, and vLLM is not "
                          "installed in this environment: install it, or give data.stream_servers "
                          "(docs/large-targets.md)")


def _stream_extractor(cfg: Config, aux: tuple[int, ...]) -> Extractor:
    """What the stream asks: vLLM servers (``data.stream_servers``) or an in-process vLLM engine."""
    m, dc = cfg.model, cfg.data
    if dc.stream_servers is not None:
        from peagle.target.vllm_server import ServerStates

        return ServerStates(dc.stream_servers, m.target, aux_layer_ids=list(aux), timeout=dc.stream_timeout,
                            concurrency=dc.stream_concurrency, trust_remote_code=m.trust_remote_code)
    from peagle.target.vllm_states import VLLMStates

    engine_args = {"gpu_memory_utilization": dc.stream_gpu_memory_utilization} if torch.cuda.is_available() else {}
    dtype = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[m.target_dtype]
    states = VLLMStates(m.target, aux_layer_ids=list(aux), tensor_parallel_size=dc.stream_tensor_parallel_size,
                        dtype=dtype, max_model_len=dc.max_length + 1, trust_remote_code=m.trust_remote_code,
                        engine_args=engine_args)
    states._start()  # in this (main) thread; a failed start is one line before any step runs
    return states


def _open_stream(cfg: Config, d: Dist, data: TrainData, state: TrainState, total: int, aux: tuple[int, ...],
                 logger: RunLogger) -> StreamedStates:
    """The streamed source, started on this rank's micro-batches from ``state`` on (the loop's order)."""
    try:
        extractor = _stream_extractor(cfg, aux)
    except ValueError as e:
        raise ConfigError(f"data.states stream: {e}") from None
    dc = cfg.data
    name = f"vLLM servers {', '.join(dc.stream_servers)}" if dc.stream_servers else "the in-process vLLM engine"
    stream = StreamedStates(extractor, lambda i: data.prepared[i]["input_ids"],
                            capacity=dc.stream_prefetch * cfg.train.grad_accum, chunk=cfg.train.grad_accum,
                            retries=dc.stream_retries,
                            stall_after=dc.stream_timeout, dtype=torch.float32 if d.device.type == "cpu" else None,
                            name=name, log=logger.write)
    stream.start(data.stream_schedule(state, total, d.rank, d.world))
    logger.write(f"data.states stream: target states from {name}, {dc.stream_prefetch} step(s) ahead "
                 f"(staging area: at most {stream.capacity} micro-batches of this rank)")
    return stream


def _load_target(cfg: Config, d: Dist, need_decoder: bool) -> Target | TargetParts:
    """The whole target, or only its embeddings/norm/lm_head when states come from a cache or a stream."""
    m = cfg.model
    try:
        if not need_decoder:
            return TargetParts(m.target, aux_layer_ids=m.aux_layer_ids, trust_remote_code=m.trust_remote_code,
                               dtype=_dtype(m.target_dtype, torch.device("cpu")))
        return Target(m.target, aux_layer_ids=m.aux_layer_ids, device=d.device, trust_remote_code=m.trust_remote_code,
                      dtype=_dtype(m.target_dtype, d.device))
    except TargetError as e:
        raise ConfigError(f"model.target: {e}") from None


def _build_draft(cfg: Config, dcfg: DraftConfig, vocab: DraftVocab, target: Target | TargetParts) -> PEagleDraft:
    """The draft (seeded), its vocabulary mapping and its initialisation from the target."""
    m = cfg.model
    dcfg.verifier_fingerprint = verifier_fingerprint(
        target, AutoTokenizer.from_pretrained(m.target, trust_remote_code=m.trust_remote_code))
    torch.manual_seed(cfg.train.seed)
    draft = PEagleDraft(dcfg)
    draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    if m.init_embed_from_target:
        draft.init_embed_tokens_from_target(target.embed_weight.float().cpu())
    if m.init_lm_head_from_target:
        draft.init_lm_head_from_target(target.lm_head_weight.float().cpu())
    if m.freeze_lm_head:
        draft.freeze_lm_head()
    draft.gradient_checkpointing = m.activation_checkpointing
    return draft
