"""Synthetic HPA-like dataset in the competition's own file format.

    python -m pipelines.synthetic --output_dir DIR [--num_samples 2000] [--image_size 512] [--seed 0] \\
        [--class_balance hpa|tempered|uniform] [--labels_csv real_train.csv] [--test_samples N] [--workers N]

writes `DIR/train/{Id}_{red,green,blue,yellow}.png` (8-bit grayscale) and `DIR/train.csv` (`Id,Target`),
and with `--test_samples` also `DIR/test/`, `DIR/sample_submission.csv` (`Id,Predicted`) and the hidden
answers in `DIR/test_labels.csv`. Each image is a field of cells with landmark stains (nuclei blue,
microtubules red, ER yellow) and a green protein stain that sums one spatial pattern per label. Small images
show a magnified part of a field (fewer, larger cells; see `RenderConfig.min_cell_radius`) so that dots, rims
and filaments stay several pixels wide; at 512 px a field holds 4-10 whole or cut cells.

The package:
  labels     class frequencies like the competition's; `draw_label_sets`, `read_label_sets` (numpy)
  cells      the field of cells: layout, landmarks, drawing primitives (numpy + scipy.ndimage)
  patterns   the landmark stains and one green pattern per class, placed relative to the landmarks
  render     `render_sample(seed, labels, image_size)`, the pure core: one sample's four uint8 stains
  png        `encode_png`, a minimal 8-bit grayscale PNG encoder
  generator  `generate(GeneratorConfig(...))` writes a whole dataset across processes; `main` is the CLI

This package is a tool for demos, tests and benchmarks, not part of the jobs: the preprocessing and training
code never imports it, so its scipy dependency is an extra (`pip install -e '.[synthetic]'`), not something
Dataflow workers install.
"""

from pipelines.synthetic.generator import (
    CONFIG_JSON,
    SUBMISSION_CSV,
    TEST_DIR,
    TEST_LABELS_CSV,
    TRAIN_CSV,
    TRAIN_DIR,
    GeneratorConfig,
    generate,
    main,
    sample_id,
)
from pipelines.synthetic.labels import (
    BALANCES,
    HPA_CLASS_COUNTS,
    HPA_LABELS_PER_SAMPLE,
    HPA_NUM_SAMPLES,
    MAX_LABELS,
    TEMPERED_POWER,
    class_frequencies,
    draw_label_sets,
    read_label_sets,
)
from pipelines.synthetic.png import encode_png
from pipelines.synthetic.render import (
    MIN_IMAGE_SIZE,
    RenderConfig,
    RenderedSample,
    render_sample,
    render_stains,
    sample_seed,
)

__all__ = [
    "BALANCES",
    "CONFIG_JSON",
    "HPA_CLASS_COUNTS",
    "HPA_LABELS_PER_SAMPLE",
    "HPA_NUM_SAMPLES",
    "MAX_LABELS",
    "MIN_IMAGE_SIZE",
    "SUBMISSION_CSV",
    "TEMPERED_POWER",
    "TEST_DIR",
    "TEST_LABELS_CSV",
    "TRAIN_CSV",
    "TRAIN_DIR",
    "GeneratorConfig",
    "RenderConfig",
    "RenderedSample",
    "class_frequencies",
    "draw_label_sets",
    "encode_png",
    "generate",
    "main",
    "read_label_sets",
    "render_sample",
    "render_stains",
    "sample_id",
    "sample_seed",
]
