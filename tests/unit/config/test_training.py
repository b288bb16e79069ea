"""Config loading: YAML + --section.key overrides, validation messages (one line, names key and file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peagle.config.training import ConfigError, all_keys, config_from_dict, load_config, parse_overrides

BASE = """\
data:
  dataset: prepared
model:
  target: llama
train:
  output_dir: runs/x
"""


@pytest.fixture()
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(BASE)
    return p


def _err(path: Path | None, overrides: list[str] | None = None, text: str | None = None) -> str:
    if text is not None and path is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_overrides(cfg_file: Path) -> None:
    cfg = load_config(
        cfg_file,
        [
            "--optim.lr",
            "1e-4",
            "--train.seed=3",
            "--model.mask_token_id",
            "17",
            "--optim.betas",
            "[0.9, 0.99]",
            "--model.max_anchors",
            "null",
        ],
    )
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.seed == 3 and cfg.model.mask_token_id == 17 and cfg.optim.betas == [0.9, 0.99]
    assert cfg.model.max_anchors is None
    assert cfg.model.num_depths == 8 and cfg.model.ratio == 0.7 and cfg.model.ratio_min == 0.2
    assert cfg.model.mask_token_id == 17
    assert load_config(cfg_file).model.mask_token_id == "auto"


def test_yaml_scientific_notation_is_a_float(cfg_file: Path) -> None:
    cfg_file.write_text(BASE + "optim:\n  lr: 3e-4\n")  # YAML 1.1 reads this as a string
    assert load_config(cfg_file).optim.lr == pytest.approx(3e-4)


def test_unknown_key_names_key_file_and_suggestion(cfg_file: Path) -> None:
    msg = _err(cfg_file, text=BASE + "optim:\n  lrr: 0.1\n")
    assert str(cfg_file) in msg and "'optim.lrr'" in msg and "did you mean 'optim.lr'" in msg
    msg = _err(cfg_file, text=BASE + "  grad_acum: 4\n")
    assert "'train.grad_acum'" in msg and "train.grad_accum" in msg


def test_right_key_wrong_section(cfg_file: Path) -> None:
    msg = _err(cfg_file, text=BASE + "  lr: 0.1\n")
    assert "'train.lr'" in msg and "did you mean 'optim.lr'" in msg


def test_unknown_section(cfg_file: Path) -> None:
    msg = _err(cfg_file, text=BASE + "optimizer:\n  lr: 0.1\n")
    assert "unknown section 'optimizer'" in msg and "optim" in msg


def test_unknown_override(cfg_file: Path) -> None:
    msg = _err(cfg_file, ["--optim.lrr", "1"])
    assert "command line" in msg and "--optim.lrr" in msg and "optim.lr" in msg
    msg = _err(cfg_file, ["--lr", "1"])
    assert "optim.lr" in msg


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        (["--train.seed", "x"], "train.seed must be an integer"),
        (["--train.micro_batch_size", "1.5"], "must be an integer"),
        (["--train.progress", "maybe"], "true/false"),
        (["--model.mask_token_id", "foo"], "an integer or 'auto'"),
        (["--train.dtype", "fp8"], "'auto' or 'bf16' or 'fp32'"),
        (["--optim.betas", "0.9"], "a list of"),
    ],
)
def test_wrong_type(cfg_file: Path, override: list[str], fragment: str) -> None:
    assert fragment in _err(cfg_file, override)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        (["--model.ratio", "1.5"], "model.ratio = 1.5 is out of range (must be <= 1.0)"),
        (["--model.ratio", "0"], "must be > 0.0"),
        (["--train.grad_accum", "0"], "train.grad_accum = 0 is out of range"),
        (["--data.val_fraction", "1.0"], "must be < 1.0"),
        (["--model.num_depths", "0"], "model.num_depths"),
        (["--model.ratio_min", "0.9"], "must not exceed model.ratio"),
        (["--optim.betas", "[0.9, 1.5]"], "optim.betas"),
        (["--model.mask_token_id", "-3"], "mask_token_id"),
        (["--model.freeze_lm_head", "true", "--model.init_lm_head_from_target", "false"], "init_lm_head_from_target"),
    ],
)
def test_out_of_range(cfg_file: Path, override: list[str], fragment: str) -> None:
    assert fragment in _err(cfg_file, override)


def test_missing_required_key(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    msg = _err(p, text="data: {dataset: d}\ntrain: {output_dir: o}\n")
    assert "model.target" in msg
    cfg = load_config(p, ["--model.target", "t"])  # a required key can come from the command line
    assert cfg.model.target == "t"


def test_bad_files(tmp_path: Path) -> None:
    assert "not found" in _err(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    msg = _err(p, text="data: {dataset: d\nmodel: [\n")
    assert "invalid YAML" in msg and str(p) in msg
    assert "mapping" in _err(p, text="- 1\n- 2\n")
    assert "must be a mapping" in _err(p, text=BASE + "optim: 3\n")


def test_parse_overrides() -> None:
    assert parse_overrides(["--a.b", "1", "--c.d=[1, 2]", "--e.f", "null", "--g.h", "x y"]) == [
        ("a.b", 1),
        ("c.d", [1, 2]),
        ("e.f", None),
        ("g.h", "x y"),
    ]
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="expected --section.key"):
        parse_overrides(["value"])


def test_all_keys_and_dict_roundtrip(cfg_file: Path) -> None:
    keys = all_keys()
    assert "optim.lr" in keys and "model.sequence_partitions" in keys and len(keys) == len(set(keys))
    from peagle.config.training import config_to_dict

    cfg = load_config(cfg_file)
    assert config_from_dict(config_to_dict(cfg)) == cfg
