"""Tests of model/presets.py: fill, command-line override, help, unknown names."""

from __future__ import annotations

import dataclasses

import pytest

from model import presets, train
from model.config import ConfigError

BASE = ["--data_dir", "d", "--model_dir", "m"]


def test_every_preset_sets_real_flags_with_a_source_and_gives_a_valid_config():
    defaults = vars(train.build_parser().parse_args(BASE))
    for name, preset in presets.PRESETS.items():
        assert preset.description and "\n" not in preset.description
        for dest, setting in preset.settings.items():
            assert dest in defaults, (name, dest)
            assert setting.source, (name, dest)
        cfg = train.config_from_args(train.parse_args([*BASE, "--preset", name]))
        assert cfg.preset == name
        for dest, setting in preset.settings.items():
            got = {**dataclasses.asdict(cfg), **dataclasses.asdict(cfg.data), **dataclasses.asdict(cfg.model)}
            assert got.get(dest, setting.value) == setting.value, (name, dest)


def test_flags_on_the_command_line_win_even_at_their_default_value():
    top = train.parse_args([*BASE, "--preset", "top-densenet121-512"])
    assert (top.backbone, top.image_size, top.loss, top.lr_schedule, top.ema, top.val_tta) == (
        "densenet121",
        512,
        "focal_lovasz",
        "cosine",
        True,
        8,
    )
    assert top.warmup_epochs >= 1 and top.rare_class == "oversample"
    # --val_tta 1 and --loss bce are the defaults: given explicitly, they still win.
    mine = train.parse_args([*BASE, "--preset", "top-densenet121-512", "--val_tta", "1", "--loss=bce"])
    assert (mine.val_tta, mine.loss, mine.backbone) == (1, "bce", "densenet121")
    small = train.parse_args([*BASE, "--epochs", "5", "--preset", "cpu-small", "--lr_patience", "2"])
    assert (small.epochs, small.lr_patience, small.learning_rate, small.lr_factor) == (5, 2, 0.003, 0.3)
    assert train.parse_args(BASE) == train.build_parser().parse_args(BASE)  # no preset: untouched


def test_unknown_preset_is_a_one_line_usage_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown preset 'fast'; the presets are: seed-resnet50, "):
        train.parse_args([*BASE, "--preset", "fast"])
    model_dir = tmp_path / "m"
    assert train.main(["--data_dir", str(tmp_path), "--model_dir", str(model_dir), "--preset", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert "error: unknown preset 'fast'" in err and "\n" not in err
    assert not model_dir.exists()


def test_help_lists_the_presets_one_line_each():
    text = train.build_parser().format_help()
    listed = text[text.index("presets (--preset NAME") :].splitlines()[1:]
    assert [line.split()[0] for line in listed] == list(presets.PRESETS)
    for line, preset in zip(listed, presets.PRESETS.values(), strict=True):
        assert line.endswith(preset.description)
