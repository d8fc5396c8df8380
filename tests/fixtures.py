"""Small datasets generated at test time: a few tiny four-stain samples in the competition's layout."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

import schemas

# The project's shared data (real competition labels and sample images), beside the repository: present on
# the developers' machines and in CI, absent in a bare clone.
SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))


def in_ci() -> bool:
    """True when the environment says it is a CI run (`CI=true`, as CI services and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def shared_path(*parts: str) -> str:
    """The path of `../shared/<parts>`, for a test that needs it.

    Skips the calling test when the file is missing, except in CI (`CI=true`), where a missing file means
    the run lacks data it should have: the test then fails and says so, instead of passing by skipping.
    """
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        message = f"{path} not found (the project's shared data, ../shared)"
        if in_ci():
            pytest.fail(f"{message}; CI=true, so this test fails instead of skipping", pytrace=False)
        pytest.skip(message)
    return path


def stain_array(seed: int, size: int = 16) -> np.ndarray:
    """A deterministic 8-bit grayscale image of `size` x `size`."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size, size), dtype=np.uint8)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    """Encodes an array as PNG (mode `L` for uint8 2-D arrays unless given)."""
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(array).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def write_sample_images(
    image_dir: str, sample_id: str, seed: int, size: int = 16, ext: str = "png"
) -> dict[str, np.ndarray]:
    """Writes `{image_dir}/{sample_id}_{stain}.{ext}` for the four stains; returns the arrays by stain."""
    os.makedirs(image_dir, exist_ok=True)
    arrays = {}
    for k, stain in enumerate(schemas.STAINS):
        arr = stain_array(seed * 10 + k, size)
        arrays[stain] = arr
        path = os.path.join(image_dir, f"{sample_id}_{stain}.{ext}")
        fmt = {"png": "PNG", "jpg": "JPEG", "tif": "TIFF", "tiff": "TIFF"}[ext]
        Image.fromarray(arr).save(path, format=fmt)
    return arrays


def write_labels_csv(
    path: str, rows: list[tuple[str, str]], header=(schemas.CSV_ID, schemas.CSV_TARGET)
) -> None:
    """Writes a label file of (Id, Target) rows."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_dataset(
    root: str,
    num_samples: int = 12,
    size: int = 16,
    seed: int = 0,
    prefix: str = "s",
    ext: str = "png",
) -> tuple[str, str, dict[str, list[int]]]:
    """Writes a labeled dataset: `{root}/train/` images and `{root}/train.csv`.

    Labels cycle through all 28 classes (1-3 per sample). Returns (labels_csv, input_dir, {id: labels}).
    """
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, "train")
    labels: dict[str, list[int]] = {}
    for i in range(num_samples):
        sid = f"{prefix}{i:04d}"
        k = int(rng.integers(1, 4))
        labs = sorted(
            {i % schemas.NUM_CLASSES, *rng.choice(schemas.NUM_CLASSES, size=k - 1, replace=False).tolist()}
        )
        labels[sid] = labs
        write_sample_images(image_dir, sid, seed=seed * 1000 + i, size=size, ext=ext)
    csv_path = os.path.join(root, "train.csv")
    write_labels_csv(csv_path, [(sid, " ".join(map(str, labs))) for sid, labs in labels.items()])
    return csv_path, image_dir, labels


WAIT_CEILING = 600.0  # seconds: how long a test waits for an event of a subprocess before giving up


def sigkill_when(proc, ready, timeout: float = WAIT_CEILING, poll: float = 0.02, children=None) -> bool:
    """SIGKILLs a running subprocess as soon as `ready()` is true; returns whether it was killed so.

    Waits for the event, not for a fixed time: `timeout` is only a ceiling (generous, for a loaded machine).
    `children`, a list, receives the pids of the processes it had started at the kill (see `wait_gone`).
    Always leaves the process ended (killed at the ceiling if it still runs).
    """
    import signal
    import time

    killed = False
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if ready():
                if children is not None:
                    from schemas import cli

                    children.extend(cli._descendants(proc.pid))
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(poll)
        proc.wait(timeout=WAIT_CEILING)
    finally:
        if proc.poll() is None:
            proc.kill()
    return killed


def wait_gone(pids, ceiling: float = WAIT_CEILING) -> bool:
    """Waits until none of `pids` runs (zombies count as gone), at most `ceiling` s; whether they are gone."""
    import time

    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + ceiling
    while time.time() < deadline and any(running(p) for p in pids):
        time.sleep(0.1)
    return not any(running(p) for p in pids)


def save_thresholds(path: str, values, num_samples: int = 0) -> None:
    """A thresholds.json as model.evaluate writes it: `values` is one threshold, or one per class."""
    from model import thresholds as thr

    n = schemas.NUM_CLASSES
    fit = thr.ThresholdFit(
        values=np.broadcast_to(np.asarray(values, dtype=np.float64), (n,)).copy(),
        rules=("fit",) * n,
        positives=(0,) * n,
        num_samples=num_samples,
        global_threshold=0.5,
        config=thr.ThresholdConfig(),
    )
    thr.save_thresholds(path, fit)


def write_model_dir(
    path: str, model, model_config, size: int, thresholds=None, data_dir: str = "data"
) -> None:
    """A model dir as the training job (model.keras, config.json) and model.evaluate (thresholds) leave it."""
    from model.config import CONFIG_FILE, MODEL_FILE, THRESHOLDS_FILE, DataConfig, TrainConfig, config_to_json

    os.makedirs(path, exist_ok=True)
    model.save(os.path.join(path, MODEL_FILE))
    cfg = TrainConfig(data_dir=data_dir, model_dir=path, data=DataConfig(image_size=size), model=model_config)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(config_to_json(cfg))
    if thresholds is not None:
        save_thresholds(os.path.join(path, THRESHOLDS_FILE), thresholds)


def random_walk_hashes(n: int, step: int, seed: int = 0, bits: int = 140, words: int = 3) -> np.ndarray:
    """(n, words) uint64 hashes, each `step` distinct random bits (of the first `bits`) from the one before.

    A chain whose neighbours are near and whose ends drift far apart: the near-duplicate groups' worst case.
    """
    rng = np.random.default_rng(seed)
    out = np.zeros((n, words), dtype=np.uint64)
    current = rng.integers(0, 2, size=bits).astype(bool)
    for i in range(n):
        if i:
            current = current.copy()
            current[rng.choice(bits, size=step, replace=False)] ^= True
        padded = np.zeros(64 * words, dtype=bool)
        padded[:bits] = current
        out[i] = (
            np.packbits(padded.reshape(words, 64), axis=1, bitorder="big")
            .view(">u8")
            .astype(np.uint64)
            .ravel()
        )
    return out
