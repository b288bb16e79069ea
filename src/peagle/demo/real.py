"""``peagle demo --real``: the demo's path on a real instruct model, SmolLM2-135M-Instruct, on this CPU.

1. the target: ``peagle.target.real_model.smollm2_dir`` (built once from the ``real`` extra's GGUF file);
2. prompts of five kinds generated from a seed (``peagle.demo.real_corpus``), held-out ones apart
   (``data/heldout/<kind>.jsonl``, never trained on);
3. the target writes every assistant turn: ``peagle regenerate --engine vllm`` in the vLLM venv
   (``.venv-vllm``, a subprocess) when there is one, else the in-process HF engine; the held-out
   multi-turn prompts get their earlier turns written the same way;
4. ``peagle prepare --mask-token-id auto`` (the full vocabulary has no spare row) ``--cache`` (the target's
   states computed once; ``--engine vllm`` in the vLLM venv when there is one) → ``peagle train``
   (``train.dtype: auto``) → ``peagle export``;
5. ``peagle eval`` on the held-out prompts: offline (fp32), and with vLLM's own counters beside it when the
   vLLM venv exists (``--engine vllm``, a subprocess);
6. ``report.md`` (``peagle.demo.real_report``), ``eval.json``, PNG plots, the draft in ``draft/``.

``run_real_demo(out_dir, quick=False)`` is the entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import peagle
from peagle.data.prepared import load_prepared
from peagle.demo.corpus import write_jsonl
from peagle.demo.real_corpus import KINDS, RealCorpus, generate_real_corpus, write_heldout
from peagle.demo.real_report import RealResults, log_real_outcome, write_real_report
from peagle.demo.report import prepare_command, write_summary
from peagle.demo.settings import REAL_FULL, REAL_QUICK, RealSettings
from peagle.demo.stages import (
    DemoError,
    Stages,
    evaluate_offline,
    link_target,
    prepare_out_dir,
    prepare_stage,
    train_config,
    write_train_config,
)
from peagle.eval.report import EvalResult, write_plots
from peagle.regenerate import HFEngine, Sampling
from peagle.regenerate import regenerate as regenerate_chats
from peagle.run.runlog import read_metrics
from peagle.run.train import train
from peagle.store.export import export_checkpoint
from peagle.store.rundir import METRICS_FILE
from peagle.target.states import cache_target_states
from peagle.util.machine import matmul_rate

__all__ = ["AL_BAR", "VLLM_VENV_ENV", "find_vllm_peagle", "load_eval_json", "run_real_demo"]

AL_BAR = 1.6  # the mean AL by vLLM's count the full run aims at, K = 4
BAR_K = 4
VLLM_VENV_ENV = "PEAGLE_VLLM_VENV"  # a vLLM venv elsewhere ("" or "none": run without vLLM)
COMMAND = "peagle demo --real"
_OWNED = ("data", "prepared", "states", "run", "draft", "plots", "report.md", "eval.json", "train.yaml",
          "summary.json")


def find_vllm_peagle() -> Path | None:
    """``bin/peagle`` of the vLLM venv: ``$PEAGLE_VLLM_VENV``, else ``.venv-vllm`` beside this checkout's
    ``src/`` or in the working directory; None when there is none (the demo then runs without vLLM)."""
    env = os.environ.get(VLLM_VENV_ENV)
    if env is not None:
        candidates = [] if env.strip().lower() in ("", "none", "0") else [Path(env)]
    else:
        candidates = [Path(peagle.__file__).resolve().parents[2] / ".venv-vllm", Path.cwd() / ".venv-vllm"]
    for venv in candidates:
        exe = venv / "bin" / "peagle"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    return None


def _run(cmd: Sequence[str | Path], log: Callable[[str], None], ok: Sequence[int] = (0,)) -> int:
    """Run a command of the vLLM venv, its output passed through; DemoError on an exit status not in ``ok``."""
    args = [str(c) for c in cmd]
    log("[demo] $ " + " ".join(args))
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    sys.stdout.flush()
    rc = subprocess.run(args, env=env, check=False).returncode
    if rc not in ok:
        raise DemoError(f"`{' '.join(args[:2])} ...` exited with status {rc}")
    return rc


# ------------------------------------------------------------------------------------------------
# the stages, in pipeline order


def _target(progress: bool) -> tuple[Path, bool]:
    """The SmolLM2 directory (built on the first run) and whether it was already built."""
    from peagle.target import real_model

    cached = real_model.read_marker(real_model.models_dir() / real_model.MODEL_NAME) is not None
    return real_model.smollm2_dir(progress=progress).resolve(), cached


def _write_prompts(out: Path, s: RealSettings) -> RealCorpus:
    """``data/train_prompts.jsonl`` and ``data/heldout/<kind>.jsonl`` (multi_turn rewritten after regeneration)."""
    corpus = generate_real_corpus(s.seed, s.num_prompts, s.heldout_per_kind)
    write_jsonl(corpus.train, out / "data" / "train_prompts.jsonl")
    write_heldout(corpus.heldout, out / "data" / "heldout")
    return corpus


def _interleave(heldout: dict[str, list[dict[str, Any]]], per_kind: int | None = None) -> list[dict[str, Any]]:
    """The first ``per_kind`` prompts of every kind, round robin, so the first n of the file (the AL measured
    during training) mix every kind."""
    lists = [lst[:per_kind] for lst in heldout.values()]
    return [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]


def _regenerate(out: Path, target_dir: Path, corpus: RealCorpus, s: RealSettings, vllm: Path | None,
                progress: bool, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """The target writes every assistant turn of the training prompts and the earlier turns of the held-out
    multi-turn prompts (one regeneration); writes ``data/train_chats.jsonl``, the held-out files and
    ``data/heldout.jsonl`` (the evaluation's share of every kind, interleaved). Returns counts for the report
    and the held-out prompts as evaluated (multi-turn ones with the target's earlier turns)."""
    data = out / "data"
    multi = [{**r, "messages": r["messages"][:-1]} for r in corpus.heldout.get("multi_turn", [])]
    source = write_jsonl([*corpus.train, *multi], data / "regenerate_input.jsonl")
    regenerated = data / "regenerated.jsonl"
    if vllm is not None:
        _run([vllm, "regenerate", source, "--out", regenerated, "--engine", "vllm", "--target", target_dir,
              "--max-tokens", s.regen_max_tokens, *([] if progress else ["--no-progress"])], log)
    else:
        regenerate_chats(source, regenerated, HFEngine(target_dir, batch_size=s.regen_batch_size),
                         sampling=Sampling(max_tokens=s.regen_max_tokens), progress=progress, log=log)
    rows = [json.loads(line) for line in regenerated.read_text().splitlines() if line.strip()]
    n = len(corpus.train)
    train_rows = [r for r in rows if r["index"] < n]
    write_jsonl(train_rows, data / "train_chats.jsonl")
    heldout = dict(corpus.heldout)
    if multi:
        written = {r["index"] - n: r["messages"] for r in rows if r["index"] >= n}
        heldout["multi_turn"] = [{**rec, "messages": written[j]} for j, rec in enumerate(multi) if j in written]
        write_heldout({"multi_turn": heldout["multi_turn"]}, data / "heldout")
    write_jsonl(_interleave(heldout, s.eval_per_kind), data / "heldout.jsonl")
    reasons = [f for r in train_rows for f in r["finish_reasons"]]
    stats = {"engine": "vLLM (subprocess of the vLLM venv)" if vllm is not None else "HF (in-process)",
             "records": len(train_rows), "turns": len(reasons), "truncated_turns": reasons.count("length"),
             "tokens": _count_tokens(target_dir, train_rows)}
    log(f"[demo] {stats['records']} training chats ({stats['turns']} target-written turns, {stats['tokens']:,} "
        f"tokens, {stats['truncated_turns']} cut at {s.regen_max_tokens}) -> {data / 'train_chats.jsonl'}")
    return stats, heldout


def _count_tokens(target_dir: Path, rows: list[dict[str, Any]]) -> int:
    """Tokens of the assistant turns (what the target generated)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    texts = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant" and m["content"]]
    return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def _prepare(out: Path, target_dir: Path, s: RealSettings, vllm: Path | None, progress: bool,
             log: Callable[[str], None]) -> dict[str, Any]:
    """``peagle prepare --mask-token-id auto`` (the mask token it picked, printed) and, with ``cache_states``,
    ``--cache states``: the target's states computed once, by vLLM's hidden-state extraction in the vLLM venv
    (fp32, ~1.7x the HF forward here) when there is one, else in-process by the HF target."""
    if vllm is not None and s.cache_states:
        args = [*prepare_command(out, target_dir, s), "--mask-token-id", "auto", "--cache", out / "states",
                "--cache-shard-size", 16, "--engine", "vllm"]
        _run([vllm, *args, *([] if progress else ["--no-progress"])], log)
    else:
        prepare_stage(out, target_dir, s, progress, log)
        if s.cache_states:
            cache_target_states(target_dir, out / "prepared", out / "states", device="cpu", shard_size=16,
                                progress=progress)
    manifest = load_prepared(out / "prepared").manifest
    counts, vocab = manifest["counts"], manifest["draft_vocab"]
    log(f"[demo] mask token: id {vocab['mask_token_id']}, {vocab['mask_token_reason']}")
    return {"mask_token_id": vocab["mask_token_id"], "mask_token_reason": vocab["mask_token_reason"],
            "examples": counts["kept"], "tokens": counts["tokens"], "supervised_tokens": counts["supervised_tokens"],
            "states": ("vLLM (subprocess of the vLLM venv)" if vllm is not None else "HF (in-process)")
            if s.cache_states else None}


def _train_config(out: Path, target_dir: Path, s: RealSettings, progress: bool) -> dict[str, Any]:
    """The demo's training config, amended: the states cache, ``dtype: auto``, the AL budget, lm_head."""
    config = train_config(out, target_dir, s, progress)
    if s.cache_states:
        config["data"]["cache"] = str(out / "states")
    config["model"]["freeze_lm_head"] = s.freeze_lm_head
    config["train"]["dtype"] = "auto"  # bf16 autocast where this CPU's bf16 matmuls measure faster
    config["eval"]["max_new_tokens"] = s.al_max_new_tokens
    return config


def load_eval_json(path: Path) -> EvalResult:
    """An :class:`EvalResult` back from the ``peagle eval --json`` file (what the vLLM subprocess wrote)."""
    d = json.loads(path.read_text())
    by_k = {int(kk): m for kk, m in d["by_k"].items()}
    k = int(d["num_speculative_tokens"])
    return EvalResult(k, by_k[k], by_k, d["prompts"], d.get("timing", {}),
                      useful_by_k={int(kk): m for kk, m in d["useful"]["by_k"].items()}, vllm=d.get("vllm"))


def _evaluate(out: Path, target_dir: Path, s: RealSettings, vllm: Path | None, progress: bool,
              log: Callable[[str], None]) -> EvalResult:
    """Offline (fp32) AL on the held-out prompts; with the vLLM venv, ``peagle eval --engine vllm`` there
    (offline prediction and vLLM's own counters in one run; status 4, counters differing, is reported)."""
    if vllm is None:
        return evaluate_offline(out, target_dir, s, progress, batch_size=16)
    _run([vllm, "eval", "--target", target_dir, "--draft", out / "draft", "--prompts", out / "data" / "heldout.jsonl",
          "--max-new-tokens", s.max_new_tokens, "--engine", "vllm", "--device", "cpu", "--batch-size", 16,
          "--json", out / "eval.json", *([] if progress else ["--no-progress"])], log, ok=(0, 4))
    ev = load_eval_json(out / "eval.json")
    ev.files.update(write_plots(ev, out / "plots"))
    ev.files["json"] = str(out / "eval.json")
    return ev


# ------------------------------------------------------------------------------------------------
# the pipeline


def run_real_demo(
    out_dir: str | Path = "demo-real-output",
    quick: bool = False,
    *,
    settings: RealSettings | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the real-model demo into ``out_dir``; returns the summary (also written as summary.json).

    vLLM is used through the vLLM venv's ``peagle`` (:func:`find_vllm_peagle`) when there is one.
    """
    t_start = time.perf_counter()
    s = settings or (REAL_QUICK if quick else REAL_FULL)
    gflops = matmul_rate(0.5) / 1e9  # the times below mean something only beside this machine's rate
    load = os.getloadavg()[0]
    vllm = find_vllm_peagle()
    log(f"[demo] this machine: {gflops:.0f} GFLOP/s measured fp32 matmul rate, load average {load:.1f} on "
        f"{os.cpu_count()} cores; vLLM: {vllm or 'none (regenerate and eval in-process, offline only)'}")
    out = Path(out_dir).resolve()
    prepare_out_dir(out, _OWNED, COMMAND)
    stages = Stages(log)

    target_dir, cached = stages.run("target", _target, progress)
    link_target(out, target_dir)
    corpus = stages.run("prompts", _write_prompts, out, s)
    regen, heldout = stages.run("regenerate", _regenerate, out, target_dir, corpus, s, vllm, progress, log)
    prep = stages.run("prepare", _prepare, out, target_dir, s, vllm, progress, log)
    config = write_train_config(out, _train_config(out, target_dir, s, progress), COMMAND)
    result = stages.run("train", train, config)
    if result.interrupted:
        raise DemoError(f"training was interrupted at step {result.step}")
    # vLLM serves the export: its config records the target's absolute path
    stages.run("export", export_checkpoint, result.checkpoint, out / "draft", overwrite=True)
    ev = stages.run("eval", _evaluate, out, target_dir, s, vllm, progress, log)

    train_log, val_log = read_metrics(out / "run" / METRICS_FILE)
    results = RealResults(
        out=out, settings=s, ev=ev, train_log=train_log, val_log=val_log, target_dir=target_dir,
        draft_choice=load_prepared(out / "prepared").draft_choice, num_chats=regen["records"],
        checkpoint=result.checkpoint, stage_seconds=stages.seconds, t_start=t_start, quick=s is REAL_QUICK,
        al_bar=AL_BAR if s is REAL_FULL else None, bar_k=min(BAR_K, s.num_depths), matmul_gflops=gflops,
        target_cached=cached, regen=regen, prep=prep, heldout={k: len(heldout.get(k, [])) for k in KINDS},
        heldout_kinds=[r["kind"] for r in _interleave(heldout, s.eval_per_kind)], vllm=vllm, load_start=load,
        autocast=_autocast(result.checkpoint))
    summary = stages.run("report", write_real_report, results)
    write_summary(out, summary, stages.seconds, t_start)
    log_real_outcome(results, summary, log)
    return summary


def _autocast(checkpoint: Path) -> str | None:
    """The dtype ``train.dtype: auto`` chose, as the final checkpoint's trainer state records it."""
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text()).get("autocast_dtype")
    except (OSError, ValueError):
        return None
