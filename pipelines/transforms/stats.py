"""Dataset-wide per-stain pixel mean and std with tf.Transform analyzers (StainStatistics)."""

from __future__ import annotations

import apache_beam as beam

import schemas
from pipelines.transforms.shards import STAT_MEAN, STAT_SQ_MEAN

STAT_STD = "stain_std"


def stats_preprocessing_fn(inputs):
    """tf.Transform preprocessing_fn: dataset-wide per-stain pixel mean and std.

    Every record has the same pixel count, so the mean of per-sample means is the pixel mean, and likewise
    for the mean of squares. Outputs the mean and std, broadcast per instance.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    mean = tft.mean(inputs[STAT_MEAN], reduce_instance_dims=False)
    sq_mean = tft.mean(inputs[STAT_SQ_MEAN], reduce_instance_dims=False)
    std = tf.sqrt(tf.maximum(sq_mean - tf.square(mean), 0.0))
    batch = tf.shape(inputs[STAT_MEAN])[0]
    return {
        STAT_MEAN: tf.broadcast_to(mean, [batch, schemas.NUM_STAINS]),
        STAT_STD: tf.broadcast_to(std, [batch, schemas.NUM_STAINS]),
    }


def _stats_metadata():
    import tensorflow as tf
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    spec = {
        STAT_MEAN: tf.io.FixedLenFeature([schemas.NUM_STAINS], tf.float32),
        STAT_SQ_MEAN: tf.io.FixedLenFeature([schemas.NUM_STAINS], tf.float32),
    }
    return dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))


@beam.ptransform_fn
def StainStatistics(stats, transform_dir: str, temp_dir: str):  # noqa: N802
    """Per-sample pixel stats -> tf.Transform analysis; the transform_fn is written to transform_dir."""
    import tensorflow_transform.beam as tft_beam

    with tft_beam.Context(temp_dir=temp_dir):
        transform_fn = (stats, _stats_metadata()) | "Analyze" >> tft_beam.AnalyzeDataset(
            stats_preprocessing_fn
        )
        return transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(transform_dir)


def read_stain_stats(transform_dir: str) -> dict[str, list[float]]:
    """Reads the per-stain mean and std back from a written transform_fn."""
    import tensorflow as tf
    import tensorflow_transform as tft

    out = tft.TFTransformOutput(transform_dir).transform_raw_features(
        {
            STAT_MEAN: tf.zeros([1, schemas.NUM_STAINS], tf.float32),
            STAT_SQ_MEAN: tf.zeros([1, schemas.NUM_STAINS], tf.float32),
        },
        drop_unused_features=True,
    )
    return {"mean": out[STAT_MEAN].numpy()[0].tolist(), "std": out[STAT_STD].numpy()[0].tolist()}
