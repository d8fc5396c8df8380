"""Named training recipes (`run_train.sh --preset NAME`): flag values, each with where it comes from.

A preset fills the flags that the command line does not give; flags given explicitly win. `PRESETS` is the one
place the recipes live (edit values there); `config.json` records the resolved values and the preset's name.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Mapping, Sequence

from model.config import ConfigError

# Where settings come from (see docs/train.md, "Presets").
ORIGINAL = "the original project (ResNet50, 3 stains, one split: macro F1 0.471)"
FIRST = "1st place of the competition (CNN alone 0.565)"
THIRD = "3rd place (weight averaging, SWA; here its exponential-average form)"
TOP = "common to the top solutions"
DEMO = "the demo (run_demo.sh)"
OURS = "this project's choice (no source gives a value)"
ESTIMATE = (
    "a computed estimate, not a GPU measurement: DenseNet121 at 512x512x4 keeps 261 M activation values per "
    "sample (every layer's output, counted by docs/gpu.md's command), 0.52 GB in 16-bit; with ~1.5x for the "
    "backward pass and ~2 GB for the CUDA context, weights, Adam state and workspace, 16 fit a 16 GB GPU"
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One flag value of a preset and the source it comes from."""

    value: Any
    source: str


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named recipe: a one-line description and the flag values (argparse dests) it sets."""

    description: str
    settings: Mapping[str, Setting]


PRESETS: dict[str, Preset] = {
    "seed-resnet50": Preset(
        "the original project's recipe on all four stains: ResNet50 from ImageNet, BCE, Adam 1e-4, plateau",
        {
            "backbone": Setting("resnet50", ORIGINAL),
            "weights": Setting("imagenet", ORIGINAL),
            "loss": Setting("bce", ORIGINAL),
            "learning_rate": Setting(1e-4, ORIGINAL),
            "lr_schedule": Setting("plateau", ORIGINAL),
        },
    ),
    "top-densenet121-512": Preset(
        "the top solutions' recipe: DenseNet121 at 512 px, 16 per GPU, focal + Lovasz, warm-up + cosine, EMA "
        "over 2 epochs, oversampling, validation TTA 8",
        {
            "backbone": Setting("densenet121", FIRST),
            "weights": Setting("imagenet", OURS),
            "image_size": Setting(512, FIRST + ": 512-1024 px crops; 28th place: 512 px"),
            "loss": Setting("focal_lovasz", FIRST + ": focal + Lovasz (their weights: " + OURS + ", 1:1)"),
            "batch_per_replica": Setting(16, ESTIMATE),
            "lr_scaling": Setting("linear", OURS + ": --learning_rate is the rate at batch 32"),
            "lr_schedule": Setting("cosine", FIRST + ": warm-up, then cosine or step"),
            "warmup_epochs": Setting(2, FIRST + " (a warm-up; its length: " + OURS + ")"),
            "ema": Setting(True, THIRD),
            "ema_epochs": Setting(2.0, THIRD + " over epochs (the horizon, 2 epochs: " + OURS + ")"),
            "rare_class": Setting("oversample", TOP + ": rare-class oversampling"),
            "val_tta": Setting(8, FIRST + ": test-time augmentation (8 flips / rotations)"),
        },
    ),
    "cpu-small": Preset(
        "the demo's CPU-sized run (64 px images): small CNN from scratch, lr 0.003, plateau x0.3 after 3 "
        "epochs, decoded stains cached in memory, TTA 8",
        {
            "backbone": Setting("small", DEMO),
            "weights": Setting("none", DEMO),
            "epochs": Setting(40, DEMO),
            "batch_size": Setting(32, DEMO),
            "cache": Setting("memory", DEMO),
            "learning_rate": Setting(0.003, DEMO),
            "lr_schedule": Setting("plateau", DEMO),
            "lr_patience": Setting(3, DEMO),
            "lr_factor": Setting(0.3, DEMO),
            "early_stopping_patience": Setting(6, DEMO),
            "val_tta": Setting(8, DEMO),
        },
    ),
}


def epilog() -> str:
    """The presets, one line each, for the training job's `--help`."""
    width = max(map(len, PRESETS))
    lines = [f"  {name:<{width}}  {p.description}" for name, p in PRESETS.items()]
    return "presets (--preset NAME; flags given on the command line win):\n" + "\n".join(lines)


def get(name: str) -> Preset:
    """The preset called name.

    Raises:
      ConfigError: no such preset.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; the presets are: {', '.join(PRESETS)}")
    return PRESETS[name]


def given_flags(
    make_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str], dests: Sequence[str]
) -> set[str]:
    """The dests that argv sets explicitly (even to their default value).

    Parses argv again into a namespace that already holds a marker for every dest: argparse then fills in no
    default, so a dest still holding the marker was not on the command line.
    """
    unset = object()
    parsed = make_parser().parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {dest for dest, value in vars(parsed).items() if value is not unset}


def apply(
    make_parser: Callable[[], argparse.ArgumentParser], args: argparse.Namespace, argv: Sequence[str]
) -> argparse.Namespace:
    """args with the flags of `args.preset` filled in, except those argv gives (no preset: args unchanged).

    Raises:
      ConfigError: an unknown preset.
    """
    if args.preset is None:
        return args
    preset = get(args.preset)
    given = given_flags(make_parser, argv, list(vars(args)))
    filled = dict(vars(args))
    for dest, setting in preset.settings.items():
        if dest not in filled:
            raise ConfigError(f"preset {args.preset}: {dest!r} is not a flag of this job")
        if dest not in given:
            filled[dest] = setting.value
    return argparse.Namespace(**filled)


def name_preset_flags(name: str | None, message: str) -> str:
    """A config error's message, with the values that preset `name` sets for the flags it names.

    A flag the user never typed but a preset filled in is otherwise a mystery in an error message.
    """
    preset = PRESETS.get(name or "")
    if preset is None:
        return message
    named = [
        f"--{dest} {setting.value}"
        for dest, setting in preset.settings.items()
        if f"--{dest} " in message + " "
    ]
    if not named:
        return message
    return f"{message} (the preset {name} sets {', '.join(named)}; pass the flag to override)"
