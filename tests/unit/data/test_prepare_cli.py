"""`peagle prepare` user errors: one line ``peagle: error: ...`` naming file:line / option, exit != 0,
no traceback, nothing left behind; skip mode through the CLI; train refusing another tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import CHATS
from test_data import swapped_vocab_tokenizer

from peagle.cli import main
from peagle.data import load_prepared

GOOD = [json.dumps({"messages": c}) for c in CHATS]


def _write(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc != 0, cap.err
    assert "Traceback" not in cap.err
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peagle: error: "), cap.err
    return lines[0]


def _bad_msg(content: object) -> str:
    return json.dumps({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "a"}]})


CASES = {
    "malformed_json": ([GOOD[0], '{"messages": ['], [], ["d.jsonl:2: malformed JSON", "pass --on-error skip"]),
    "not_utf8": ([GOOD[0], b'{"messages": "\xff"}'], [], ["d.jsonl:2: not valid UTF-8 (byte 0xff",
                                                          "pass --on-error skip"]),
    "image_part": ([_bad_msg([{"type": "image_url", "image_url": {"url": "u"}}])], [],
                   ["d.jsonl:1: message 0 (user): content part 0 has type 'image_url'"]),
    "numeric_content": ([GOOD[0], _bad_msg(42)], [], ["d.jsonl:2: message 0 (user): content must be a string",
                                                      "got a number (42)"]),
    "bad_arguments": ([json.dumps({"messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]})], [],
        ["d.jsonl:1: message 1 (assistant) tool_calls[0].function.arguments is a string that is not valid JSON"]),
    "split_on_file": (GOOD, ["--split", "test"], ["split 'test'", "has no named splits"]),
    "template_kwargs": (GOOD, ["--chat-template-kwargs", "{enable"], ["--chat-template-kwargs is not valid JSON"]),
    "template_kwargs_list": (GOOD, ["--chat-template-kwargs", "[1]"], ["must be a JSON object"]),
    "missing_template": (GOOD, ["--chat-template", "nope.jinja"], ["chat template file nope.jinja not found"]),
    "max_length": (GOOD, ["--max-length", "1"], ["--max-length must be at least 2"]),
    "limit": (GOOD, ["--limit", "0"], ["--limit must be >= 1"]),
    "mask_in_data": (GOOD, ["--draft-vocab-size", "100", "--mask-token-id", "BOS"],
                     ["mask_token_id", "occurs", "times in the prepared data"]),
    "mask_not_int": (GOOD, ["--mask-token-id", "many"], ["--mask-token-id must be 'auto' or an integer"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepare_user_errors_are_one_line(capsys, llama_dir, chat_tokenizer, tmp_path, case) -> None:
    lines, extra, fragments = CASES[case]
    data = _write(tmp_path / "d.jsonl", lines)
    extra = [str(chat_tokenizer.bos_token_id) if x == "BOS" else x for x in extra]
    out = tmp_path / "o"
    line = _one_error_line(capsys, ["prepare", str(data), "--target", str(llama_dir), "--out", str(out),
                                    "--no-progress", *extra])
    for f in fragments:
        assert f in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # no dataset, no hidden temp dir


def test_prepare_destination_errors(capsys, llama_dir, tmp_path) -> None:
    data = _write(tmp_path / "d.jsonl", GOOD)
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    base = ["prepare", str(data), "--target", str(llama_dir), "--no-progress"]
    assert "is a file, not a directory" in _one_error_line(capsys, [*base, "--out", str(afile)])
    assert f"is under {afile}, which is a file" in _one_error_line(capsys, [*base, "--out", str(afile / "x")])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    line = _one_error_line(capsys, [*base, "--out", str(model), "--overwrite"])
    assert "is not a prepared dataset (it holds config.json)" in line
    assert (model / "config.json").read_text() == "{}"
    assert "is not empty (use --overwrite" in _one_error_line(capsys, [*base, "--out", str(model)])


def test_prepare_non_utf8_template_and_json_file(capsys, llama_dir, tmp_path) -> None:
    tpl = tmp_path / "t.jinja"
    tpl.write_bytes(b"{{ 'a' }}\n\xfe")
    data = _write(tmp_path / "d.jsonl", GOOD)
    base = ["prepare", "--target", str(llama_dir), "--out", str(tmp_path / "o"), "--no-progress"]
    assert f"{tpl}:2: not valid UTF-8 (byte 0xfe)" in _one_error_line(
        capsys, [*base, str(data), "--chat-template", str(tpl)])
    js = tmp_path / "d.json"
    js.write_bytes(b'[\n{"messages": "\xe9"}]')
    assert f"{js}:2: not valid UTF-8 (byte 0xe9)" in _one_error_line(capsys, [*base, str(js)])
    pq = tmp_path / "d.parquet"
    pq.write_text("not parquet")
    assert f"{pq}: not a readable parquet file" in _one_error_line(capsys, [*base, str(pq)])


def test_prepare_skip_mode_summary(capsys, llama_dir, tmp_path) -> None:
    data = _write(tmp_path / "d.jsonl", [GOOD[0], "{oops", GOOD[1], b'{"messages": "\xff"}', GOOD[2]])
    out = tmp_path / "o"
    rc = main(["prepare", str(data), "--target", str(llama_dir), "--out", str(out), "--no-progress",
               "--on-error", "skip"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "records read: 5 (2 bad, skipped)" in cap.out
    assert "examples kept: 3 from 3 records" in cap.out
    assert "bad records skipped: 2\n  malformed_json: 1\n  not_utf8: 1\n" in cap.out
    assert f"  e.g. {data}:2: malformed JSON" in cap.out and f"  e.g. {data}:4: not valid UTF-8" in cap.out
    assert "one_rendering: 3 records" in cap.out and f"prepared dataset: {out}" in cap.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bad_records"]["counts"] == {"malformed_json": 1, "not_utf8": 1}
    assert load_prepared(out).draft_choice["mask_token_id"] == manifest["draft_vocab"][
        "mask_token_id"]
    # llama_dir's model has 8 rows past its tokenizer: the first spare row, and the summary says why
    mask = manifest["draft_vocab"]["mask_token_id"]
    assert "spare embedding row" in manifest["draft_vocab"]["mask_token_reason"]
    assert f"mask_token_id: {mask} (the first spare embedding row" in cap.out


def test_train_refuses_a_dataset_prepared_with_another_tokenizer(capsys, llama_dir, tmp_path) -> None:
    """Same vocabulary size, same class, another vocabulary: training must not start."""
    data = _write(tmp_path / "d.jsonl", GOOD)
    prep = tmp_path / "prep"
    assert main(["prepare", str(data), "--target", str(llama_dir), "--out", str(prep), "--no-progress",
                 "--max-length", "64"]) == 0
    capsys.readouterr()
    other = tmp_path / "other_target"
    swapped_vocab_tokenizer(llama_dir, other)
    assert (other / "config.json").read_text() == (Path(llama_dir) / "config.json").read_text()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"dataset": str(prep), "max_length": 64},
        "model": {"target": str(other), "num_layers": 1, "num_depths": 2},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False, "tensorboard": False},
    }))
    line = _one_error_line(capsys, ["train", str(cfg)])
    assert f"data.dataset: {prep} was prepared for another tokenizer than {other}'s (vocabulary sha256 " in line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("step-*"))
    shutil.rmtree(other)
