"""What kind of folder a user gave: the hint in an error when a command was handed the wrong one.

A newcomer's commonest slip is the right folder on the wrong flag: the image folder as `--data_dir`, the
preprocessing output as `--input_dir`, the dataset's root (train.csv beside train/) instead of either. The
commands' errors say which flag the folder belongs to. Local folders only (a gs:// path gets no hint).
"""

from __future__ import annotations

import os

from schemas.record import MANIFEST_FILE

SHARDS, IMAGES, RAW, MODEL, OTHER = "shards", "images", "raw", "model", "other"
_MODEL_FILES = ("config.json", "model.keras", "history.csv")
_PEEK = 200  # names looked at in a large folder


def kind_of(path: str) -> str:
    """SHARDS (a preprocessing output), IMAGES (stain image files), RAW (a dataset root: a labels CSV beside
    image folders), MODEL (a training run), else OTHER (also: missing, remote or unreadable)."""
    if "://" in path or not os.path.isdir(path):
        return OTHER
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return OTHER
    if MANIFEST_FILE in names:
        return SHARDS
    if sum(name in names for name in _MODEL_FILES) >= 2:
        return MODEL
    from schemas import stains

    if any(stains.stain_of(name) for name in names[:_PEEK]):
        return IMAGES
    folders = [n for n in names if os.path.isdir(os.path.join(path, n))]
    if any(n.endswith(".csv") for n in names) and folders:
        return RAW
    return OTHER


def hint_for_data_dir(path: str, command: str = "") -> str:
    """Why `path` is no preprocessing output, and what to do, for a `--data_dir` error ('' for OTHER)."""
    kind = kind_of(path)
    images_flag = {"hpa-predict": "--input_dir", "hpa-batch-predict": "--input_dir"}.get(command)
    if kind == IMAGES:
        if images_flag:
            return f"{path} holds stain images, not preprocessed shards: give it as {images_flag} {path}"
        return f"{path} holds stain images: preprocess them first (hpa-preprocess --input_dir {path} ...)"
    if kind == RAW:
        return (
            f"{path} is a dataset's root (a labels CSV beside image folders): preprocess it first "
            f"(hpa-preprocess --labels_csv {os.path.join(path, 'train.csv')} --input_dir "
            f"{os.path.join(path, 'train')} --output_dir OUT), then give OUT as --data_dir"
        )
    if kind == MODEL:
        return f"{path} is a training run's folder: give it as --model_dir"
    return ""


def hint_for_input_dir(path: str) -> str:
    """Why `path` holds no stain images, and what to do, for an `--input_dir` error ('' for OTHER)."""
    kind = kind_of(path)
    if kind == SHARDS:
        return f"{path} is a preprocessing output ({MANIFEST_FILE}), not images: give it as --data_dir {path}"
    if kind == RAW:
        sub = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))[0]
        return (
            f"{path} is a dataset's root: give its image folder, e.g. --input_dir {os.path.join(path, sub)}"
        )
    if kind == MODEL:
        return f"{path} is a training run's folder: give it as --model_dir"
    return ""
