"""Batch prediction's model step: Beam's RunInference with the training job's exported SavedModel.

ScoreWithModel    (Id, uint8 image) -> (Id, float64 scores) of one model dir's export (its
                  `serve_images` signature), averaged over the test-time transforms
                  (model.model.tta_average), as model.predict scores with the Keras model
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from pipelines.progress import ProgressFile

COUNTERS = "batch_predict"  # the Beam metrics namespace of batch prediction


def score_phase(index: int) -> str:
    """The progress phase of the index-th model."""
    return f"model{index}"


class ExportedModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """RunInference's handler for the training job's export: images scored under every TTA transform.

    The model is the SavedModel of `export_dir` (`tf.saved_model.load`; Beam's stock TensorFlow handler
    loads through `tf.keras.models.load_model`, which in Keras 3 reads `.keras` files only, and needs
    tensorflow_hub). Each batch is scored by the export's IMAGES_SIGNATURE under every transform and
    averaged by `model.model.tta_average` in float64, exactly as model.predict does with the Keras model.
    """

    def __init__(self, export_dir: str, transforms: Sequence[int], batch_size: int):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self._export_dir = export_dir
        self._transforms = tuple(int(k) for k in transforms)

    def load_model(self):
        import tensorflow as tf

        return tf.saved_model.load(self._export_dir)

    def run_inference(
        self, batch: Sequence[np.ndarray], model, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        from model import model as model_lib

        serve = model.signatures[model_lib.IMAGES_SIGNATURE]

        def predict(images):
            return serve(**{model_lib.IMAGES_INPUT: images})[model_lib.PROBABILITIES]

        scores = model_lib.tta_average(predict, np.stack(batch), self._transforms)
        return [PredictionResult(x, s, self._export_dir) for x, s in zip(batch, scores, strict=True)]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return COUNTERS


class _ScoresFn(beam.DoFn):
    """(Id, PredictionResult) -> (Id, model index, float64 scores), counted for the progress line."""

    def __init__(self, index: int, progress_dir: str | None):
        self._index = index
        self._progress_dir = progress_dir

    def setup(self):
        self._progress = ProgressFile(self._progress_dir, score_phase(self._index))

    def process(self, item):
        sid, result = item
        self._progress.add(done=1)
        yield sid, np.asarray(result.inference, dtype=np.float64)

    def finish_bundle(self):
        self._progress.flush()


@beam.ptransform_fn
def ScoreWithModel(  # noqa: N802
    images,
    export_dir: str,
    transforms: Sequence[int],
    batch_size: int,
    index: int = 0,
    progress_dir: str | None = None,
):
    """(Id, image) -> (Id, float64 scores [NUM_CLASSES]) of one exported model, averaged over `transforms`."""
    handler = KeyedModelHandler(ExportedModelHandler(export_dir, transforms, batch_size))
    return (
        images
        | "RunInference" >> RunInference(handler)
        | "Scores" >> beam.ParDo(_ScoresFn(index, progress_dir))
    )
