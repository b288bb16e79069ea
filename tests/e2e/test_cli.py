"""Bad input through the CLI: one clear line on stderr, exit status != 0, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from peagle.cli import main

GOOD = [
    {"messages": [{"role": "user", "content": "count from 3 to 9"}, {"role": "assistant", "content": "3 4 5 6 7 8 9"}]},
    {
        "messages": [
            {"role": "user", "content": "sort these words: pear, apple, fig"},
            {"role": "assistant", "content": "apple, fig, pear"},
        ]
    },
] * 4


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("peagle")]
    assert len(lines) == 1 and lines[0].startswith("peagle: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def prepared(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    out = d / "prep"
    assert (
        main(
            [
                "prepare",
                str(_jsonl(d / "good.jsonl", GOOD)),
                "--target",
                str(llama_dir),
                "--out",
                str(out),
                "--max-length",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def _cfg(tmp: Path, prepared: Path, target: Path, **train: object) -> Path:
    cfg = {
        "data": {"dataset": str(prepared), "max_length": 64},
        "model": {"target": str(target), "num_layers": 1, "num_depths": 2},
        "train": {
            "dtype": "fp32",
            "output_dir": str(tmp / "run"),
            "max_steps": 2,
            "progress": False,
            "tensorboard": False,
            "save_every": 1,
            **train,
        },
    }
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


# -- prepare -----------------------------------------------------------------------------------


def test_malformed_json_line_names_file_and_line(capsys, llama_dir, tmp_path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [GOOD[0], '{"messages": [', GOOD[1]])
    _fails(
        capsys,
        ["prepare", str(data), "--target", str(llama_dir), "--out", str(tmp_path / "o"), "--no-progress"],
        f"{data}:2",
        "malformed JSON",
    )
    assert not (tmp_path / "o").exists()


def test_no_assistant_turns_empty_dataset(capsys, llama_dir, tmp_path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    _fails(
        capsys,
        ["prepare", str(data), "--target", str(llama_dir), "--out", str(tmp_path / "o"), "--no-progress"],
        "empty dataset",
        "no_assistant",
    )


def test_unknown_role(capsys, llama_dir, tmp_path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "wizard", "content": "hi"}]}])
    _fails(
        capsys,
        ["prepare", str(data), "--target", str(llama_dir), "--out", str(tmp_path / "o"), "--no-progress"],
        "unknown role",
        "wizard",
        f"{data}:1",
    )


def test_tokenizer_without_chat_template(capsys, chat_tokenizer_dir, tmp_path) -> None:
    tok = tmp_path / "tok"
    shutil.copytree(chat_tokenizer_dir, tok)
    (tok / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    _fails(
        capsys,
        ["prepare", str(data), "--target", str(tok), "--out", str(tmp_path / "o"), "--no-progress"],
        "no chat template",
        "--chat-template",
    )


def test_prompt_longer_than_max_length(capsys, llama_dir, tmp_path) -> None:
    long_prompt = {"messages": [{"role": "user", "content": "count " * 40}, {"role": "assistant", "content": "ok"}]}
    data = _jsonl(tmp_path / "d.jsonl", [long_prompt] * 2)
    _fails(
        capsys,
        [
            "prepare",
            str(data),
            "--target",
            str(llama_dir),
            "--out",
            str(tmp_path / "o"),
            "--max-length",
            "16",
            "--no-progress",
        ],
        "empty dataset",
        "prompt_longer_than_max_length",
    )


def test_mask_token_out_of_range_or_in_data(capsys, llama_dir, chat_tokenizer, tmp_path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    vocab = json.loads((llama_dir / "config.json").read_text())["vocab_size"]
    _fails(
        capsys,
        [
            "prepare",
            str(data),
            "--target",
            str(llama_dir),
            "--out",
            str(tmp_path / "o1"),
            "--mask-token-id",
            str(vocab + 5),
            "--no-progress",
        ],
        "out of range",
    )
    _fails(
        capsys,
        [
            "prepare",
            str(data),
            "--target",
            str(llama_dir),
            "--out",
            str(tmp_path / "o2"),
            "--mask-token-id",
            "many",
            "--no-progress",
        ],
        "--mask-token-id",
    )
    bos = chat_tokenizer.bos_token_id
    _fails(
        capsys,
        [
            "prepare",
            str(data),
            "--target",
            str(llama_dir),
            "--out",
            str(tmp_path / "o3"),
            "--mask-token-id",
            str(bos),
            "--no-progress",
        ],
        f"mask_token_id {bos} occurs",
    )


def test_bad_draft_vocab_size(capsys, llama_dir, tmp_path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    _fails(
        capsys,
        [
            "prepare",
            str(data),
            "--target",
            str(llama_dir),
            "--out",
            str(tmp_path / "o"),
            "--draft-vocab-size",
            "100000",
            "--no-progress",
        ],
        "--draft-vocab-size",
    )


def test_missing_input_file(capsys, llama_dir, tmp_path) -> None:
    _fails(
        capsys,
        [
            "prepare",
            str(tmp_path / "nope.jsonl"),
            "--target",
            str(llama_dir),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        "nope.jsonl",
    )


# -- train -------------------------------------------------------------------------------------


def test_config_unknown_key_and_wrong_type(capsys, prepared, llama_dir, tmp_path) -> None:
    cfg = _cfg(tmp_path, prepared, llama_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["optim"] = {"lrr": 0.1}
    cfg.write_text(yaml.safe_dump(raw))
    _fails(capsys, ["train", str(cfg)], "unknown key 'optim.lrr'", "did you mean 'optim.lr'", str(cfg))
    cfg = _cfg(tmp_path, prepared, llama_dir)
    _fails(capsys, ["train", str(cfg), "--train.max_steps", "many"], "train.max_steps must be")
    _fails(capsys, ["train", str(tmp_path / "missing.yaml")], "config file not found")


def test_target_not_a_model(capsys, prepared, chat_tokenizer_dir, tmp_path) -> None:
    _fails(
        capsys, ["train", str(_cfg(tmp_path, prepared, chat_tokenizer_dir))], "model.target", "not a model directory"
    )


def test_aux_layer_ids_out_of_range(capsys, prepared, llama_dir, tmp_path) -> None:
    cfg = _cfg(tmp_path, prepared, llama_dir)
    _fails(capsys, ["train", str(cfg), "--model.aux_layer_ids", "[2, 3, 99]"], "aux_layer_ids", "out of range")


def test_dataset_not_prepared(capsys, llama_dir, tmp_path) -> None:
    _fails(capsys, ["train", str(_cfg(tmp_path, tmp_path, llama_dir))], "data.dataset", "peagle prepare")


def test_corrupt_checkpoint_refused_previous_kept(capsys, prepared, llama_dir, tmp_path) -> None:
    cfg = _cfg(tmp_path, prepared, llama_dir, max_steps=2, save_every=1)
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    good, bad = run / "step-00000001", run / "step-00000002"
    assert good.is_dir() and bad.is_dir()
    # a second run into the same directory must not silently start over
    _fails(capsys, ["train", str(cfg)], "already holds checkpoints", "--resume auto")
    opt = bad / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    line = _fails(
        capsys,
        ["train", str(cfg), "--resume", "auto", "--train.max_steps", "3"],
        "is corrupt",
        "optimizer.pt",
        "truncated",
    )
    assert str(good) in line  # points at the newest good checkpoint
    _fails(capsys, ["train", str(cfg), "--resume", str(bad)], "truncated")
    assert good.is_dir() and bad.is_dir()
    # the good one still resumes
    assert main(["train", str(cfg), "--resume", str(good), "--train.max_steps", "3"]) == 0


def test_export_bad_source(capsys, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["export", str(tmp_path / "empty"), str(tmp_path / "out")], "neither")
    _fails(capsys, ["export", str(tmp_path / "missing"), str(tmp_path / "out")], "no such")


def test_usage_error_exit_code(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


@pytest.mark.slow
def test_sigterm_saves_and_exits_130(prepared, llama_dir, tmp_path) -> None:
    """SIGTERM mid-run: the step finishes, a checkpoint is written, exit 130; --resume auto continues."""
    cfg = _cfg(tmp_path, prepared, llama_dir, max_steps=100000, save_every=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "peagle.cli", "train", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    ckpts = sorted((tmp_path / "run").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file()
    step = int(ckpts[0].name.split("-")[1])
    assert step >= 2
    assert main(["train", str(cfg), "--resume", "auto", "--train.max_steps", str(step + 1)]) == 0
