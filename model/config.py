"""Configuration of the training job: frozen dataclasses with the defaults, and their JSON form.

`TrainConfig` composes a `DataConfig` (input pipeline) and a `ModelConfig` (network). `model/train.py` fills
them from flags; the resolved config is written as `config.json` in the model directory so a run can be
reproduced and a restarted run can check that it continues the same experiment.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

BACKBONES: tuple[str, ...] = (
    "small",
    "resnet50",
    "densenet121",
    "efficientnetv2b0",
    "efficientnetv2b1",
    "efficientnetv2b2",
    "efficientnetv2b3",
    "efficientnetv2s",
    "efficientnetv2m",
    "efficientnetv2l",
)
BACKBONES_WITHOUT_WEIGHTS: tuple[str, ...] = ("small",)  # no pretrained weights exist for these
LOSSES: tuple[str, ...] = ("bce", "focal", "lovasz", "focal_lovasz")
LR_SCALINGS: tuple[str, ...] = ("none", "linear")
PRECISIONS: tuple[str, ...] = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
RARE_CLASS_MODES: tuple[str, ...] = ("none", "oversample", "weight")
LR_PLATEAU, LR_COSINE, LR_STEP = "plateau", "cosine", "step"
LR_SCHEDULES: tuple[str, ...] = (LR_PLATEAU, LR_COSINE, LR_STEP)
WARMUP_START_FACTOR = 0.01  # a linear warm-up starts at this fraction of the learning rate
WEIGHTS_IMAGENET = "imagenet"
CACHE_NONE = "none"  # --cache: decode the PNGs every epoch
CACHE_MEMORY = "memory"  # --cache: decoded stains kept in memory; any other value is a directory
WEIGHTS_NONE = "none"

# Input normalisation (`--input_norm`). `zscore`: each stain minus the dataset's mean, over its std. The
# others feed the red, green and blue stains the way the backbone's ImageNet weights were trained (Keras'
# preprocess_input, or EfficientNetV2's built-in preprocessing), and the yellow stain in the same units
# without an offset (see model.model.input_normalization):
#   caffe: BGR, 0..255 minus the ImageNet mean;  torch: RGB, x / 255 minus the ImageNet mean, over its std;
#   pm1: RGB, x / 128 - 1.
INPUT_NORM_AUTO = "auto"
INPUT_NORM_ZSCORE = "zscore"
INPUT_NORM_IMAGENET = "imagenet"
INPUT_NORM_CHOICES: tuple[str, ...] = (INPUT_NORM_AUTO, INPUT_NORM_ZSCORE, INPUT_NORM_IMAGENET)
IMAGENET_INPUT_NORMS: dict[str, str] = {
    "resnet50": "caffe",
    "densenet121": "torch",
    "efficientnetv2b0": "torch",  # EfficientNetV2's built-in preprocessing: torch-style for the B variants,
    "efficientnetv2b1": "torch",
    "efficientnetv2b2": "torch",
    "efficientnetv2b3": "torch",
    "efficientnetv2s": "pm1",  # x / 128 - 1 for S, M and L
    "efficientnetv2m": "pm1",
    "efficientnetv2l": "pm1",
}
INPUT_NORMS: tuple[str, ...] = (INPUT_NORM_ZSCORE, "caffe", "torch", "pm1")  # the resolved values


# Layout of a model directory (--model_dir): what the training job writes and the later steps read.
CONFIG_FILE = "config.json"
RUN_SECTION = "run"  # config.json's record of the devices a run trained on (not part of the config)
MODEL_FILE = "model.keras"
EXPORT_DIR = "export"
HISTORY_FILE = "history.csv"
PLOTS_FILE = "plots.png"
LOGS_DIR = "logs"
RUN_INFO_FILE = "run_info.json"
BACKUP_DIR = "backup"
BEST_WEIGHTS = "checkpoints/best.weights.h5"
VAL_PREDICTIONS_FILE = "val_predictions.npz"  # arrays VAL_IDS [n] str, VAL_LABELS [n, 28], VAL_SCORES [n, 28]
VAL_IDS, VAL_LABELS, VAL_SCORES = "ids", "labels", "scores"
F1_METRIC = "f1"  # the training metric macro F1 (threshold 0.5): history.csv's f1, val_f1
THRESHOLDS_FILE = "thresholds.json"  # written by model.evaluate, read by model.predict

TTA_CHOICES = (1, 2, 4, 8)
# Test-time augmentation with n transforms: the `model.data.dihedral` indices averaged (k % 4 right-angle
# rotations, then a left-right flip if k >= 4), identity first.
_TTA_TRANSFORMS = {
    1: (0,),
    2: (0, 4),  # + left-right flip
    4: (0, 4, 6, 2),  # + up-down flip (rot180 then left-right flip), + rot180: the flip group
    8: (0, 1, 2, 3, 4, 5, 6, 7),
}


def tta_transforms(n: int) -> tuple[int, ...]:
    """The `model.data.dihedral` indices averaged for test-time augmentation with n in TTA_CHOICES."""
    if n not in _TTA_TRANSFORMS:
        raise ValueError(f"tta must be one of {TTA_CHOICES}, got {n}")
    return _TTA_TRANSFORMS[n]


class ConfigError(ValueError):
    """Bad flags or a dataset / model directory that does not fit them; the message says what to change."""


def _check_at_least(config, low: int, *names: str) -> None:
    """Raises ConfigError for the first of the fields `names` of `config` set (not None) below `low`."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The input pipeline.

    Attributes:
      image_size: side of the stored images; None takes it from the dataset's manifest.
      batch_size: global batch size (split across replicas).
      shuffle_buffer: records held by the training shuffle (serialized records, before decoding); unused
        with a cache, which serves a new uniform permutation every epoch.
      augment: the 8 flips / right-angle rotations while training.
      crop_size: random crop side while training (None: no crop); evaluation keeps the whole image.
      intensity_jitter: max relative per-stain brightness change while training (0: off).
      rare_class: `none`, `oversample` (repeat samples of rare classes) or `weight` (weight their positives).
      rare_power: class factor = (max class count / class count) ** rare_power ...
      rare_max_factor: ... clipped to [1, rare_max_factor].
      tf_data_service: `grpc://host:port` of a tf.data service dispatcher that runs the training pipeline.
      seed: seed of the training shuffles, oversampling draws and augmentation (None: different every run).
      cache: `none`, `memory` or a local directory: where the decoded stains of the training and validation
        folds are kept after the first pass (samples x H x W x 4 bytes), see `model.cache`.
      cache_keep: caches a cache directory keeps (this dataset's included); older ones of other data go.
      deterministic: deterministic tf.data order and op determinism, so that the same seed, data and
        flags give bit-identical results (slower); needs a seed.
    """

    image_size: int | None = None
    batch_size: int = 32
    shuffle_buffer: int = 1024
    augment: bool = True
    crop_size: int | None = None
    intensity_jitter: float = 0.0
    rare_class: str = "none"
    rare_power: float = 0.5
    rare_max_factor: float = 4.0
    tf_data_service: str | None = None
    seed: int | None = None
    cache: str = CACHE_NONE
    cache_keep: int = 1
    deterministic: bool = False

    def __post_init__(self) -> None:
        _check_at_least(self, 1, "batch_size", "shuffle_buffer", "image_size", "crop_size")
        if self.crop_size is not None and self.image_size is not None and self.crop_size > self.image_size:
            raise ConfigError(f"crop_size {self.crop_size} is larger than image_size {self.image_size}")
        if not 0.0 <= self.intensity_jitter < 1.0:
            raise ConfigError(f"intensity_jitter must be in [0, 1), got {self.intensity_jitter}")
        if self.rare_class not in RARE_CLASS_MODES:
            raise ConfigError(f"rare_class must be one of {RARE_CLASS_MODES}, got {self.rare_class!r}")
        if self.rare_max_factor < 1.0:
            raise ConfigError(f"rare_max_factor must be >= 1, got {self.rare_max_factor}")
        if self.tf_data_service is not None and "://" not in self.tf_data_service:
            raise ConfigError(
                f"tf_data_service must look like grpc://host:port, got {self.tf_data_service!r}"
            )
        if not self.cache:
            raise ConfigError("cache must be 'none', 'memory' or a directory")
        if self.deterministic and self.tf_data_service is not None:
            raise ConfigError(
                "--deterministic cannot be combined with --tf_data_service: the service hands out batches "
                "in the order its workers finish them"
            )
        if self.deterministic and self.seed is None:
            raise ConfigError("--deterministic needs a --seed")
        if self.tf_data_service is not None and self.cache != CACHE_NONE:
            raise ConfigError(
                "--cache cannot be combined with --tf_data_service (the cache is read by index on this "
                "host, through Python, which a tf.data service worker cannot run)"
            )
        if self.cache_keep < 1:
            raise ConfigError(f"cache_keep must be >= 1, got {self.cache_keep}")
        if self.tf_data_service is not None and self.seed is not None:
            raise ConfigError(
                "seed and tf_data_service cannot be combined: "
                "every tf.data worker would produce the same stream"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network.

    Attributes:
      backbone: one of BACKBONES (`small` is a little CNN for CPU runs and tests).
      weights: `imagenet`, `none` (None: `default_weights` of the backbone), or the path of a saved
        backbone (3 or 4 input channels; `.keras` or `.weights.h5`) whose weights are copied, the first
        convolution adapted to four stains.
      dropout: dropout rate before the classifier.
      small_filters: width of the `small` backbone's first block (doubles per block).
      input_norm: how the uint8 stains are scaled for the backbone: `auto` (resolved by `resolve_input_norm`:
        `imagenet` for a keras.applications backbone with pretrained weights, else `zscore`), `zscore`,
        `imagenet`, or a resolved value of INPUT_NORMS (as config.json records it).
    """

    backbone: str = "resnet50"
    weights: str | None = None
    dropout: float = 0.25
    small_filters: int = 16
    input_norm: str = INPUT_NORM_AUTO

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weights is None:
            object.__setattr__(self, "weights", default_weights(self.backbone))
        if not self.weights:
            raise ConfigError("weights must be 'imagenet', 'none' or a file path")
        if self.backbone in BACKBONES_WITHOUT_WEIGHTS and self.weights == WEIGHTS_IMAGENET:
            raise ConfigError(f"the {self.backbone} backbone has no ImageNet weights: use --weights none")
        resolve_input_norm(self)


def default_weights(backbone: str) -> str:
    """`--weights` when not given: what the backbone has (ImageNet weights, none for `small`)."""
    return WEIGHTS_NONE if backbone in BACKBONES_WITHOUT_WEIGHTS else WEIGHTS_IMAGENET


def resolve_input_norm(cfg: ModelConfig) -> str:
    """The input normalisation of INPUT_NORMS that `cfg.input_norm` stands for with this backbone and weights.

    `auto` is `zscore` for the small backbone or `--weights none` (no pretrained kernels expect any range;
    per-stain standardisation treats the four stains alike) and the backbone's ImageNet normalisation with
    `imagenet` or a weights file (a 3-channel file is taken to hold weights trained the ImageNet way).

    Raises:
      ConfigError: an unknown value, or an ImageNet normalisation that does not belong to the backbone.
    """
    imagenet = IMAGENET_INPUT_NORMS.get(cfg.backbone)
    norm = cfg.input_norm
    if norm == INPUT_NORM_AUTO:
        return INPUT_NORM_ZSCORE if imagenet is None or cfg.weights == WEIGHTS_NONE else imagenet
    if norm == INPUT_NORM_ZSCORE:
        return norm
    if norm not in (INPUT_NORM_IMAGENET, *INPUT_NORMS):
        raise ConfigError(f"input_norm must be one of {INPUT_NORM_CHOICES + INPUT_NORMS}, got {norm!r}")
    if imagenet is None:
        raise ConfigError(f"the {cfg.backbone} backbone has no ImageNet input normalisation; use zscore")
    if norm not in (INPUT_NORM_IMAGENET, imagenet):
        raise ConfigError(
            f"input_norm {norm!r} does not fit {cfg.backbone}, whose ImageNet weights take {imagenet!r}"
        )
    return imagenet


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
      data_dir: the preprocessing job's output directory (local or gs://).
      model_dir: where the run writes its outputs (local or gs://).
      val_fold: fold held out for validation; the other folds train.
      epochs: planned number of epochs.
      steps_per_epoch: training steps per epoch (None: one pass over the training set).
      validation_steps: validation steps (None: the whole validation fold).
      learning_rate: initial Adam learning rate.
      loss: `bce`, `focal`, `lovasz` (the Lovasz hinge per class) or `focal_lovasz` (focal + Lovasz).
      focal_gamma: focusing parameter of the focal loss.
      precision: `auto` (bfloat16 on GPUs of compute capability >= 8.0, float16 below, float32 on CPU) or
        an explicit Keras dtype policy.
      lr_schedule: `plateau` (ReduceLROnPlateau on validation loss), `cosine` (cosine decay over the
        epochs after the warm-up, down to min_lr) or `step` (the rate times lr_factor at each of lr_steps).
      warmup_epochs: epochs of linear warm-up from WARMUP_START_FACTOR x learning_rate (0: none).
      lr_steps: the epochs at which the `step` schedule multiplies the rate by lr_factor (None: at 1/2 and
        3/4 of the epochs); each after the warm-up and before the last epoch.
      lr_factor, lr_patience, min_lr: ReduceLROnPlateau's factor and patience (lr_factor also the `step`
        schedule's); min_lr the floor of plateau and the end of cosine.
      ema: validate, checkpoint and export an exponential moving average of the weights (the optimizer's
        use_ema) instead of the last weights.
      ema_momentum: the average's momentum (weight of the old average at each step).
      ema_epochs: the average's horizon in epochs (None: ema_momentum as given); the momentum is then
        1 - 1 / (ema_epochs x steps per epoch), resolved by `ema_momentum_for`.
      ema_bn_batches: with ema, the training batches (of the per-replica batch) over which BatchNorm's moving
        statistics are recomputed for the averaged weights whenever those are validated or saved
        (`model/batchnorm.py`); None: about 2,048 samples (`batchnorm.default_batches`); 0: off (the
        statistics of the last raw weights).
      lr_scaling: `linear` (learning_rate is the rate at reference_batch; the run uses learning_rate x
        global batch / reference_batch, the linear scaling rule of Goyal et al. 2017) or `none`.
      reference_batch: the global batch learning_rate is given for under `linear`.
      preset: the `--preset` the flags were filled from (None: no preset); a record, not a setting.
      early_stopping_patience: EarlyStopping on validation loss (epochs without improvement).
      val_tta: test-time augmentation (1, 2, 4 or 8 transforms) of the saved validation predictions, which
        thresholds are tuned on; match the prediction's --tta.
      data, model: the pipeline and network configs.
    """

    data_dir: str
    model_dir: str
    val_fold: int = 0
    epochs: int = 30
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    learning_rate: float = 1e-4
    loss: str = "bce"
    focal_gamma: float = 2.0
    precision: str = "auto"
    lr_schedule: str = LR_PLATEAU
    warmup_epochs: int = 0
    lr_steps: tuple[int, ...] | None = None
    lr_factor: float = 0.1
    lr_patience: int = 2
    min_lr: float = 1e-7
    early_stopping_patience: int = 6
    ema: bool = False
    ema_momentum: float = 0.99
    ema_epochs: float | None = None
    ema_bn_batches: int | None = None
    lr_scaling: str = "none"
    reference_batch: int = 32
    val_tta: int = 1
    preset: str | None = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        _check_at_least(self, 1, "epochs", "steps_per_epoch", "validation_steps")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 < self.lr_factor < 1.0:
            raise ConfigError(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if self.val_fold < 0:
            raise ConfigError(f"val_fold must be >= 0, got {self.val_fold}")
        if self.val_tta not in TTA_CHOICES:
            raise ConfigError(f"val_tta must be one of {TTA_CHOICES}, got {self.val_tta}")
        self._check_schedule()
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if self.ema_epochs is not None and self.ema_epochs <= 0:
            raise ConfigError(f"--ema_epochs must be > 0, got {self.ema_epochs}")
        if self.ema_bn_batches is not None and self.ema_bn_batches < 0:
            raise ConfigError(f"--ema_bn_batches must be >= 0 (0: off), got {self.ema_bn_batches}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f"--lr_scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")
        if self.reference_batch < 1:
            raise ConfigError(f"--reference_batch must be >= 1, got {self.reference_batch}")

    def scaled_learning_rate(self) -> float:
        """The rate the optimizer starts from: learning_rate, times batch / reference_batch under `linear`."""
        if self.lr_scaling == "linear":
            return self.learning_rate * self.data.batch_size / self.reference_batch
        return self.learning_rate

    def ema_momentum_for(self, steps_per_epoch: int) -> float:
        """The average's momentum per optimizer step: from ema_epochs when given, else ema_momentum."""
        if self.ema_epochs is None:
            return self.ema_momentum
        return 1.0 - 1.0 / max(1.0, self.ema_epochs * steps_per_epoch)

    def _check_schedule(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(
                f"--warmup_epochs {self.warmup_epochs} leaves no epoch after the warm-up: "
                f"it must be less than --epochs {self.epochs}"
            )
        if self.lr_schedule == LR_COSINE and self.min_lr >= self.learning_rate:
            raise ConfigError(
                f"--min_lr {self.min_lr} must be below --learning_rate {self.learning_rate} (cosine's end)"
            )
        if self.lr_steps is None:
            if self.lr_schedule == LR_STEP:  # resolved here, so config.json records the epochs
                steps = default_lr_steps(self.epochs, self.warmup_epochs)
                if not steps:
                    raise ConfigError(
                        f"--lr_schedule step: no epoch between the warm-up ({self.warmup_epochs}) and the "
                        f"last epoch ({self.epochs}) to step at; use more --epochs"
                    )
                object.__setattr__(self, "lr_steps", steps)
            return
        if self.lr_schedule != LR_STEP:
            raise ConfigError(f"--lr_steps is for --lr_schedule step, not {self.lr_schedule}")
        steps = tuple(int(s) for s in self.lr_steps)
        object.__setattr__(self, "lr_steps", steps)  # a JSON list back to the tuple it was
        if not steps or list(steps) != sorted(set(steps)):
            raise ConfigError(f"--lr_steps must be increasing epoch numbers, got {list(steps)}")
        if steps[0] <= self.warmup_epochs or steps[-1] >= self.epochs:
            raise ConfigError(
                f"--lr_steps {','.join(map(str, steps))}: each step must come after the warm-up "
                f"(epoch > {self.warmup_epochs}) and before the last epoch (< {self.epochs})"
            )


def default_lr_steps(epochs: int, warmup_epochs: int) -> tuple[int, ...]:
    """The `step` schedule's default epochs: 1/2 and 3/4 of the epochs, after the warm-up, before the end."""
    steps = {max(warmup_epochs + 1, round(epochs * f)) for f in (0.5, 0.75)}
    return tuple(sorted(s for s in steps if s < epochs))


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a JSON-ready dict (nested dataclasses become dicts)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Inverse of `config_to_dict`, ignoring config.json's RUN_SECTION; unknown keys raise a ConfigError."""
    d = dict(d)
    d.pop(RUN_SECTION, None)
    try:
        data = DataConfig(**d.pop("data", {}))
        # Configs written before input_norm existed were trained on z-scored stains.
        model = ModelConfig(**{"input_norm": INPUT_NORM_ZSCORE, **d.pop("model", {})})
        return TrainConfig(data=data, model=model, **d)
    except TypeError as e:
        raise ConfigError(f"not a training config: {e}") from e


def config_to_json(cfg: TrainConfig) -> str:
    """The config as indented JSON text."""
    return json.dumps(config_to_dict(cfg), indent=2, sort_keys=True)
