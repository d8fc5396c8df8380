"""Tests of model/data.py: the input pipeline over shards written here with schemas.to_example."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import schemas
from model import data as data_lib
from model.config import ConfigError, DataConfig
from tests.fixtures import png_bytes, stain_array


def write_dataset(
    root: str,
    per_fold: tuple[int, ...] = (6, 6, 6),
    size: int = 16,
    shards_per_fold: int = 2,
    num_test: int = 0,
    seed: int = 0,
    labels_fn=None,
) -> dict[str, dict]:
    """Writes a preprocessed dataset (shards + manifest) the way the preprocessing job lays it out.

    Args:
      root: the dataset directory (gets tfrecords/ and manifest.json).
      per_fold: records per fold (a 0 writes no shard for that fold).
      labels_fn: (global index) -> class indices; default: index % NUM_CLASSES plus class 0.

    Returns:
      {id: {"fold", "labels" (multi-hot), "image" (uint8 [size, size, 4])}}.
    """
    os.makedirs(os.path.join(root, schemas.TFRECORD_DIR), exist_ok=True)
    labels_fn = labels_fn or (lambda i: sorted({0, i % schemas.NUM_CLASSES}))
    samples: dict[str, dict] = {}
    folds = [(f, n) for f, n in enumerate(per_fold)] + (
        [(schemas.UNLABELED_FOLD, num_test)] if num_test else []
    )
    pixels = []
    index = 0
    for fold, n in folds:
        if n == 0:
            continue
        writers = [
            tf.io.TFRecordWriter(
                os.path.join(root, schemas.TFRECORD_DIR, schemas.shard_name(fold, s, shards_per_fold))
            )
            for s in range(shards_per_fold)
        ]
        for j in range(n):
            sid = f"id{index:04d}"
            stains = [stain_array(seed * 100000 + index * 10 + k, size) for k in range(schemas.NUM_STAINS)]
            labels = (
                np.zeros(schemas.NUM_CLASSES, np.int64)
                if fold == schemas.UNLABELED_FOLD
                else schemas.labels_to_multi_hot(labels_fn(index))
            )
            sample = schemas.Sample(
                id=sid,
                images={s: png_bytes(a) for s, a in zip(schemas.STAINS, stains, strict=True)},
                height=size,
                width=size,
                labels=labels,
                fold=fold,
                source="train",
            )
            writers[j % shards_per_fold].write(schemas.to_example(sample).SerializeToString())
            image = np.stack(stains, axis=-1)
            samples[sid] = {"fold": fold, "labels": labels, "image": image}
            pixels.append(image.reshape(-1, schemas.NUM_STAINS))
            index += 1
        for w in writers:
            w.close()
    allpix = np.concatenate(pixels).astype(np.float64)
    manifest = {
        schemas.MANIFEST_SCHEMA_VERSION: schemas.SCHEMA_VERSION,
        schemas.MANIFEST_IMAGE_SIZE: [size, size],
        schemas.MANIFEST_NUM_FOLDS: len(per_fold),
        schemas.MANIFEST_WRITTEN: {schemas.written_key(f): n for f, n in folds},
        schemas.MANIFEST_STAIN_STATS: {"mean": allpix.mean(0).tolist(), "std": allpix.std(0).tolist()},
    }
    with open(os.path.join(root, schemas.MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)
    return samples


def dihedral_np(image: np.ndarray, k: int) -> np.ndarray:
    """Reference: numpy version of data.dihedral (rot90 counter-clockwise k % 4, then left-right flip)."""
    out = np.rot90(image, k % 4, axes=(0, 1))
    return out[:, ::-1] if k >= 4 else out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    samples = write_dataset(root, per_fold=(6, 5, 7), num_test=3)
    return root, samples


def test_list_shards_per_fold_and_missing_fold(dataset):
    root, _ = dataset
    files = data_lib.list_shards(root, [0, 2])
    assert len(files) == 4 and all(os.path.basename(f).startswith(("fold0", "fold2")) for f in files)
    assert data_lib.list_shards(root, [schemas.UNLABELED_FOLD])[0].endswith(schemas.shard_name(-1, 0, 2))
    with pytest.raises(ConfigError, match="fold 7"):
        data_lib.list_shards(root, [7])


def test_eval_dataset_decodes_exact_pixels_labels_and_ids_in_a_stable_order(dataset):
    root, samples = dataset
    cfg = DataConfig(batch_size=4)
    ds = data_lib.make_eval_dataset(root, [0, 1], cfg, with_ids=True)
    seen = []
    for images, labels, ids in ds:
        assert images.dtype == tf.uint8 and images.shape[1:] == (16, 16, schemas.NUM_STAINS)
        assert labels.dtype == tf.float32 and labels.shape[1:] == (schemas.NUM_CLASSES,)
        for img, lab, sid in zip(images.numpy(), labels.numpy(), ids.numpy(), strict=True):
            sid = sid.decode()
            np.testing.assert_array_equal(img, samples[sid]["image"])
            np.testing.assert_array_equal(lab, samples[sid]["labels"])
            seen.append(sid)
    expected = sorted(s for s, v in samples.items() if v["fold"] in (0, 1))
    assert sorted(seen) == expected and len(seen) == len(set(seen))
    again = [i.decode() for _, _, ids in ds for i in ids.numpy()]
    assert again == seen


def test_eval_dataset_reads_unlabeled_test_shards_and_tta(dataset):
    root, samples = dataset
    ds = data_lib.make_eval_dataset(
        root, [schemas.UNLABELED_FOLD], DataConfig(batch_size=8), with_ids=True, tta=5
    )
    images, labels, ids = next(iter(ds))
    assert len(ids) == 3 and not labels.numpy().any()
    for img, sid in zip(images.numpy(), ids.numpy(), strict=True):
        np.testing.assert_array_equal(img, dihedral_np(samples[sid.decode()]["image"], 5))
    with pytest.raises(ValueError, match="tta"):
        data_lib.make_eval_dataset(root, [0], DataConfig(), tta=8)


def test_dihedral_gives_the_eight_symmetries():
    image = np.arange(5 * 5 * 2, dtype=np.uint8).reshape(5, 5, 2)
    outs = [data_lib.dihedral(tf.constant(image), k).numpy() for k in range(data_lib.NUM_DIHEDRAL)]
    for k, out in enumerate(outs):
        np.testing.assert_array_equal(out, dihedral_np(image, k))
    assert len({o.tobytes() for o in outs}) == 8


def test_training_dataset_is_infinite_full_batches_of_augmented_stored_images(dataset):
    root, samples = dataset
    cfg = DataConfig(batch_size=4, shuffle_buffer=8)
    ds = data_lib.make_dataset(root, [0, 2], cfg, training=True)
    variants = {
        dihedral_np(v["image"], k).tobytes(): sid
        for sid, v in samples.items()
        if v["fold"] in (0, 2)
        for k in range(8)
    }
    batches = list(ds.take(10))  # 40 samples from 13: the dataset repeats
    assert len(batches) == 10
    transformed = 0
    for images, labels in batches:
        assert images.dtype == tf.uint8 and tuple(images.shape) == (4, 16, 16, schemas.NUM_STAINS)
        for img, lab in zip(images.numpy(), labels.numpy(), strict=True):
            sid = variants.get(img.tobytes())
            assert sid is not None, "a training image is not a flip/rotation of a stored image of folds 0, 2"
            np.testing.assert_array_equal(lab, samples[sid]["labels"])
            transformed += not np.array_equal(img, samples[sid]["image"])
    assert transformed > 0  # augmentation is on


def test_training_without_augmentation_crop_and_jitter(dataset):
    root, samples = dataset
    stored = {v["image"].tobytes() for v in samples.values()}
    plain = data_lib.make_dataset(root, [1], DataConfig(batch_size=5, augment=False), training=True)
    images, _ = next(iter(plain))
    assert all(img.tobytes() in stored for img in images.numpy())

    cropped = data_lib.make_dataset(
        root, [1], DataConfig(batch_size=5, augment=False, crop_size=8), training=True
    )
    images, _ = next(iter(cropped))
    assert images.shape == (5, 8, 8, schemas.NUM_STAINS)
    windows = {
        v["image"][y : y + 8, x : x + 8].tobytes()
        for v in samples.values()
        for y in range(9)
        for x in range(9)
    }
    assert all(img.tobytes() in windows for img in images.numpy())

    jitter = data_lib.make_dataset(
        root, [1], DataConfig(batch_size=5, augment=False, intensity_jitter=0.3), training=True
    )
    images, _ = next(iter(jitter))
    assert images.dtype == tf.uint8
    assert not any(img.tobytes() in stored for img in images.numpy())


def test_oversampling_raises_the_share_of_rare_class_samples(tmp_path):
    root = str(tmp_path)
    # One sample in 8 holds the rare class 27; the others only class 0.
    write_dataset(root, per_fold=(16, 16), labels_fn=lambda i: [27] if i % 8 == 0 else [0])
    labels = data_lib.read_labels(root, [0, 1])
    assert labels.shape == (32, schemas.NUM_CLASSES) and labels[:, 27].sum() == 4 and labels[:, 0].sum() == 28

    def rare_share(rare_class):
        cfg = DataConfig(batch_size=16, augment=False, rare_class=rare_class, rare_max_factor=3.0, seed=1)
        ys = np.concatenate([y.numpy() for _, y in data_lib.make_dataset(root, [0, 1], cfg, True).take(40)])
        return ys[:, 27].mean()

    base, over = rare_share("none"), rare_share("oversample")
    # factor of class 27 = min(3, (28 / 4) ** 0.5) = 2.65: expected share 4 * 2.65 / (28 + 4 * 2.65) = 0.27
    assert base == pytest.approx(4 / 32, abs=0.05)
    assert over == pytest.approx(0.27, abs=0.05)


def test_tf_data_service_serves_the_training_pipeline(dataset):
    root, _ = dataset
    dispatcher = tf.data.experimental.service.DispatchServer()
    address = dispatcher.target.split("://")[1]
    worker = tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(dispatcher_address=address)
    )
    try:
        cfg = DataConfig(batch_size=4, tf_data_service=dispatcher.target)
        batches = list(data_lib.make_dataset(root, [0], cfg, training=True).take(3))
        assert [tuple(b[0].shape) for b in batches] == [(4, 16, 16, schemas.NUM_STAINS)] * 3
        assert worker._num_tasks() >= 1
    finally:
        worker._stop()
        dispatcher._stop()


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match="grpc"):
        DataConfig(tf_data_service="localhost:5000")
    with pytest.raises(ConfigError, match="same stream"):
        DataConfig(tf_data_service="grpc://localhost:5000", seed=1)
    with pytest.raises(ConfigError, match="rare_class"):
        DataConfig(rare_class="upsample")
