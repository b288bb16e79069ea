"""Where a training step's time goes: torch profiler over real steps, ops grouped into what they do.

    python benchmarks/profile_step.py demo [--run-config demo-output/train.yaml]   # the demo's step (L = 512, 4 rows)
    python benchmarks/profile_step.py bench [--length 2048]                        # benchmarks/step.py's step

`demo` builds the run of a finished `make demo` (its train.yaml: prepared data, cached target) and profiles
`peagle.run.train.train_step` — target states included, as the demo pays them. `bench` profiles the benchmark
draft's step (`benchmarks/step.py`'s shapes). Printed: the top ops by self CPU time, and the share of
matmuls, attention, elementwise/normalisation, loss, target forward and the rest.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

GROUPS = {
    "matmul (linear layers)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "softmax / logsumexp / exp": ("aten::_softmax", "aten::logsumexp", "aten::exp", "aten::_log_softmax",
                                  "aten::log_softmax", "aten::softmax", "aten::_softmax_backward_data"),
    "elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::silu", "aten::pow",
                    "aten::rsqrt", "aten::mean", "aten::sum", "aten::where", "aten::cat", "aten::copy_",
                    "aten::silu_backward", "aten::clamp", "aten::masked_fill", "aten::fill_", "aten::zero_"),
    "indexing": ("aten::index", "aten::index_select", "aten::gather", "aten::index_put_", "aten::scatter_add_",
                 "aten::index_add_", "aten::embedding", "aten::embedding_dense_backward", "aten::_index_put_impl_",
                 "aten::searchsorted", "aten::sort", "aten::nonzero"),
}


def _group(name: str) -> str:
    for group, names in GROUPS.items():
        if name in names:
            return group
    return "other"


def _report(prof: profile, steps: int, wall: float) -> None:
    rows = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    print(f"\n{steps} steps, {wall / steps:.3f} s/step wall; aten self CPU time {total / 1e6 / steps:.3f} s/step")
    print("\n| op | self CPU ms/step | share | calls/step |\n|---|---:|---:|---:|")
    for e in sorted(rows, key=lambda e: -e.self_cpu_time_total)[:20]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / steps:.1f} | {e.self_cpu_time_total / total:.1%} | "
              f"{e.count // steps} |")
    shares: dict[str, float] = {}
    for e in rows:
        shares[_group(e.key)] = shares.get(_group(e.key), 0.0) + e.self_cpu_time_total
    print("\n| group | share |\n|---|---:|")
    for g, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {t / total:.1%} |")
    scopes = [e for e in prof.key_averages() if e.key.startswith("peagle.")]
    if scopes:
        print("\n| scope | CPU ms/step (incl.) |\n|---|---:|")
        for e in sorted(scopes, key=lambda e: -e.cpu_time_total):
            print(f"| {e.key} | {e.cpu_time_total / 1e3 / steps:.1f} |")
    print(f"calls per step (all ops): {sum(e.count for e in prof.key_averages()) // steps}")


def profile_demo(config: Path, steps: int) -> None:
    import yaml

    from peagle.config.training import config_from_dict
    from peagle.run.build import build
    from peagle.run.train import train_step
    from peagle.util.machine import keep_freed_memory

    keep_freed_memory()  # as `peagle train` runs
    raw = yaml.safe_load(config.read_text())
    raw["train"].update(output_dir=tempfile.mkdtemp(prefix="peagle-profile-"), progress=False)
    raw["eval"] = {"enabled": False}
    run = build(config_from_dict(raw, str(config)))
    positions = iter(run.data.positions(run.state, run.total))
    source_states = run.source.states

    def timed_states(packed):  # noqa: ANN001, ANN202
        with record_function("peagle.target_states"):
            return source_states(packed)

    run.source.states = timed_states
    run.trainer.train()
    for _ in range(3):  # warm-up
        train_step(run, *next(positions))
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("peagle.train_step"):
                train_step(run, *next(positions))
    _report(prof, steps, time.perf_counter() - t0)


def profile_bench(length: int, steps: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from step import build as build_case  # noqa: PLC0415 - the benchmark's own case
    from step import make_trainer, step_forwards

    from peagle.util.machine import keep_freed_memory

    keep_freed_memory()  # as `peagle train` runs
    draft, batch = build_case(length, 0)
    trainer = make_trainer(draft, "structured", 1)
    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-3)

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        for forward in step_forwards(trainer, batch):
            forward().loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
        opt.step()

    one()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            one()
    _report(prof, steps, time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--run-config", type=Path, default=Path("demo-output/train.yaml"))
    d.add_argument("--steps", type=int, default=10)
    b = sub.add_parser("bench")
    b.add_argument("--length", type=int, default=2048)
    b.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    if a.what == "demo":
        if not a.run_config.is_file():
            print(f"profile_step.py: error: {a.run_config} not found: run `make demo` first", file=sys.stderr)
            return 1
        profile_demo(a.run_config, a.steps)
    else:
        profile_bench(a.length, a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
