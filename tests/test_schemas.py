"""The record format: round trip, class list, layout helpers."""

import numpy as np
import pytest
import tensorflow as tf

import schemas
from tests import fixtures


def _sample(fold=2, source="train", size=8):
    images = {s: fixtures.png_bytes(fixtures.stain_array(k, size)) for k, s in enumerate(schemas.STAINS)}
    return schemas.Sample(
        id="abc-123",
        images=images,
        height=size,
        width=size,
        labels=schemas.labels_to_multi_hot([0, 25, 27]),
        fold=fold,
        source=source,
    )


@pytest.mark.parametrize("fold", [0, 4, schemas.UNLABELED_FOLD])
def test_round_trip(fold):
    x = _sample(fold=fold)
    assert schemas.example_to_sample(schemas.to_example(x).SerializeToString()) == x


def test_parse_batched_and_decode():
    x = _sample(size=8)
    ser = tf.constant([schemas.to_example(x).SerializeToString()] * 3)
    parsed = schemas.parse_example(ser)
    assert parsed[schemas.LABELS_KEY].shape == (3, schemas.NUM_CLASSES)
    single = schemas.parse_example(ser[0])
    image = schemas.decode_stains(single, image_size=8)
    assert image.dtype == tf.uint8 and image.shape == (8, 8, schemas.NUM_STAINS)
    for k in range(schemas.NUM_STAINS):
        np.testing.assert_array_equal(image[:, :, k].numpy(), fixtures.stain_array(k, 8))


def test_decode_rejects_wrong_size():
    single = schemas.parse_example(tf.constant(schemas.to_example(_sample(size=8)).SerializeToString()))
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        schemas.decode_stains(single, image_size=16)


def test_class_names_and_targets():
    assert len(schemas.CLASS_NAMES) == 28 and len(set(schemas.CLASS_NAMES)) == 28
    assert schemas.CLASS_NAMES[0] == "Nucleoplasm" and schemas.CLASS_NAMES[27] == "Rods & rings"
    vec = schemas.labels_to_multi_hot([25, 0])
    assert schemas.format_target(vec) == "0 25"
    with pytest.raises(ValueError):
        schemas.labels_to_multi_hot([28])


def test_shard_names():
    assert schemas.shard_name(3, 1, 12) == "fold3-00001-of-00012.tfrecord"
    assert schemas.shard_name(schemas.UNLABELED_FOLD, 0, 1) == "test-00000-of-00001.tfrecord"
    assert schemas.shard_pattern("gs://b/d", 0) == "gs://b/d/tfrecords/fold0-*-of-*.tfrecord"


def test_to_example_checks_labels_and_stains():
    x = _sample()
    with pytest.raises(ValueError):
        schemas.to_example(schemas.Sample(x.id, x.images, 8, 8, np.zeros(5, np.int64)))
    with pytest.raises(ValueError):
        schemas.to_example(schemas.Sample(x.id, {"red": b""}, 8, 8, x.labels))
