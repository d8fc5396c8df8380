"""Training-time augmentation as the model's first layer, so that it runs on the accelerator.

`StainAugmentation` takes the uint8 stain batch the input pipeline ships and, in training only, draws per
sample: an optional random crop, one of the 8 symmetries of the square (three independent coin flips:
transpose, flip rows, flip columns; their 8 combinations are exactly the dihedral group that
`model.data.dihedral` indexes for test-time augmentation) and an optional per-stain intensity jitter.
At inference (`training` false or None: `predict`, evaluation, the exported serving model) it returns its
input unchanged, so a model is served and predicted on whole images as before.

The layer uses TensorFlow ops (the project's Keras backend); a uint8 [B, H, W, 4] batch is moved as one
4-byte word per pixel (a free bitcast), which makes the selects several times faster than on uint8 bytes.
With a GPU the word is a float32: the pixels are only moved (transpose, reverse, select, gather: no
arithmetic touches the bits), and TensorFlow's GPU kernels of ReverseV2 for int32 keep their data in host
memory (a GPU -> host -> GPU copy of the batch each step without XLA), whereas the float32 kernels run on the
device (tests/test_gpu_kernels.py checks every op of the layer against TF's kernel registry). Without a GPU
the word stays an int32, which was faster on this project's CPUs (`python -m bench.augment_words`).
Randomness comes from a `keras.random.SeedGenerator` built from the run's seed, advanced once per step and
folded with the replica's index in its tf.distribute sync group (`replica_id_in_sync_group`, counting every
replica of every worker): each replica draws its own transforms, and the same seed gives the same draws, step
after step; the draws are stateless ops (reproducible under op determinism). The generator's state is one
variable shared by the replicas (a MirroredVariable), so without the fold every replica drew the same.
On the host, rotating uint8 images costs far more than moving them (../shared/FACTS.md: 2,019 samples/s for
cache + shuffle + batch, 430 with one `tf.image.rot90` per batch); on a GPU these selects and gathers are
memory-bound element-wise ops next to a backbone's convolutions.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf
from keras import layers

AUGMENTATION_NAME = "augmentation"


@keras.saving.register_keras_serializable(package="hpa")
class StainAugmentation(layers.Layer):
    """Per-sample random crop, dihedral transform and per-stain intensity jitter of [B, H, W, C] images.

    Args:
      dihedral: draw one of the 8 flips / right-angle rotations per sample (needs square images).
      crop_size: side of a random square crop per sample (None: no crop). The output is then
        [B, crop_size, crop_size, C] in training and the whole image at inference.
      intensity_jitter: per sample and stain, multiply by a factor in [1 - j, 1 + j] (0: off); the result is
        rounded and clipped to 0..255 and keeps the input dtype.
      seed: seed of the draws (None: a random seed).
    """

    def __init__(
        self,
        dihedral: bool = True,
        crop_size: int | None = None,
        intensity_jitter: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if not 0.0 <= intensity_jitter < 1.0:
            raise ValueError(f"intensity_jitter must be in [0, 1), got {intensity_jitter}")
        self.dihedral = bool(dihedral)
        self.crop_size = None if crop_size is None else int(crop_size)
        self.intensity_jitter = float(intensity_jitter)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="augmentation_seed")
        self.supports_masking = False

    @property
    def is_identity(self) -> bool:
        """True when the layer changes nothing even in training."""
        return not self.dihedral and self.crop_size is None and self.intensity_jitter == 0.0

    def call(self, inputs, training=None):
        if not training or self.is_identity:
            return inputs
        crop_seed, dihedral_seed, jitter_seed = tf.unstack(_replica_seeds(self.seed_generator, 3))
        x, packed = _pack(inputs, word_dtype())
        if self.crop_size is not None:
            x = self._crop(x, crop_seed)
        if self.dihedral:
            x = self._dihedral(x, dihedral_seed)
        x = _unpack(x, packed)
        if self.intensity_jitter > 0.0:
            x = self._jitter(x, jitter_seed)
        return x

    def _crop(self, x, seed):
        shape = tf.shape(x)
        batch, height, width = shape[0], shape[1], shape[2]
        size = self.crop_size
        top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
        top = tf.random.stateless_uniform((batch,), top_seed, 0, height - size + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform((batch,), left_seed, 0, width - size + 1, dtype=tf.int32)
        steps = tf.range(size, dtype=tf.int32)
        rows = top[:, None] + steps[None, :]  # [B, size]
        cols = left[:, None] + steps[None, :]
        x = tf.gather(x, rows, axis=1, batch_dims=1)
        return tf.gather(x, cols, axis=2, batch_dims=1)

    def _dihedral(self, x, seed):
        coins = tf.random.stateless_uniform((tf.shape(x)[0], 3), seed, minval=0, maxval=2, dtype=tf.int32)
        extra = [1] * (x.shape.rank - 1)
        coins = tf.reshape(tf.cast(coins, tf.bool), [-1, 3, *extra])  # [B, 3, 1, 1(, 1)]
        perm = [0, 2, 1, *range(3, x.shape.rank)]
        x = tf.where(coins[:, 0], tf.transpose(x, perm), x)
        x = tf.where(coins[:, 1], tf.reverse(x, [1]), x)
        return tf.where(coins[:, 2], tf.reverse(x, [2]), x)

    def _jitter(self, x, seed):
        shape = tf.shape(x)
        j = self.intensity_jitter
        scale = tf.random.stateless_uniform((shape[0], 1, 1, shape[3]), seed, 1.0 - j, 1.0 + j, tf.float32)
        out = tf.clip_by_value(tf.round(tf.cast(x, tf.float32) * scale), 0.0, 255.0)
        return tf.cast(out, x.dtype)

    def compute_output_shape(self, input_shape):
        if self.crop_size is None:
            return input_shape
        return (input_shape[0], self.crop_size, self.crop_size, input_shape[3])

    def compute_output_spec(self, inputs, training=None):
        # Symbolic calls (building the functional model) see the inference path's shape and dtype.
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            dihedral=self.dihedral,
            crop_size=self.crop_size,
            intensity_jitter=self.intensity_jitter,
            seed=self.seed,
        )
        return config


def _replica_seeds(generator: keras.random.SeedGenerator, n: int) -> tf.Tensor:
    """n stateless seeds [n, 2] for this step and this replica: the generator's next seed folded with the
    replica's index in its sync group (0 outside a strategy), then split."""
    context = tf.distribute.get_replica_context()
    replica = 0 if context is None else context.replica_id_in_sync_group
    step = tf.cast(generator.next(), tf.int64)
    key = tf.random.experimental.stateless_fold_in(step, tf.cast(replica, tf.int64))
    return tf.random.experimental.stateless_split(key, num=n)


_GPU_WORD = tf.float32
_forced_word: list[tf.DType] = []  # set by `traced_as_on_a_gpu`


def word_dtype() -> tf.DType:
    """The 4-byte word a pixel is moved as: float32 when TensorFlow sees a GPU (device-memory kernels), else
    int32 (faster on a CPU)."""
    if _forced_word:
        return _forced_word[-1]
    return _GPU_WORD if tf.config.list_logical_devices("GPU") else tf.int32


@contextlib.contextmanager
def traced_as_on_a_gpu():
    """Within it, the layer traces the graph a GPU host runs (hpa-doctor checks that graph on any host)."""
    _forced_word.append(_GPU_WORD)
    try:
        yield
    finally:
        _forced_word.pop()


def _pack(x, word: tf.DType):
    """uint8 [B, H, W, 4] -> word [B, H, W] (the four stains of a pixel as one word: a free bitcast), so
    that moving pixels moves 4-byte words; TF's selects of uint8 are several times slower. The word's bits
    are only moved, never computed with, so any byte pattern (NaN ones included) comes back unchanged.
    Other inputs are left as they are."""
    if x.dtype == tf.uint8 and x.shape[-1] == 4:
        return tf.bitcast(x, word), True
    return x, False


def _unpack(x, packed: bool):
    return tf.bitcast(x, tf.uint8) if packed else x


def from_data_config(cfg, seed: int | None = None) -> StainAugmentation | None:
    """The augmentation layer a `DataConfig` asks for (None when it asks for none).

    Args:
      cfg: a `model.config.DataConfig` (augment, crop_size, intensity_jitter, seed).
      seed: overrides cfg.seed.
    """
    layer = StainAugmentation(
        dihedral=cfg.augment,
        crop_size=cfg.crop_size,
        intensity_jitter=cfg.intensity_jitter,
        seed=cfg.seed if seed is None else seed,
        name=AUGMENTATION_NAME,
    )
    return None if layer.is_identity else layer
