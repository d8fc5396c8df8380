"""Packaging of the project: `schemas`, `pipelines` and `model`, and its `hpa-*` commands.

Dataflow workers install the project from this file (`--setup_file ./setup.py`): `install_requires` only.
Exact versions that are known to resolve together live in constraints.txt (`pip install -c constraints.txt
-e .[synthetic,test]`); the CUDA build for GPU hosts is the `gpu` extra, locked in constraints-gpu.txt
(`make setup-gpu`).
"""

import sys

import setuptools

if sys.version_info[:2] != (3, 11):
    sys.exit(
        f"This project needs Python 3.11 (TF 2.21 + Beam 2.77 + tf.Transform 1.21 are pinned for it); "
        f"this is Python {sys.version.split()[0]}. Use e.g. `make setup PYTHON=python3.11`."
    )

REQUIRED = [
    "apache-beam[gcp]>=2.77,<2.78",
    "tensorflow>=2.21,<2.22",
    "tensorflow-transform>=1.21,<1.22",
    "tensorboard>=2.21,<2.22",  # Keras' TensorBoard callback; TF 2.21 does not bring it
    "numpy",
    "pillow",
    "urllib3>=2",  # HTTP of the download job (already installed with apache-beam, through requests)
    "matplotlib",  # training curves and report plots
]
# The synthetic dataset generator (`pipelines/synthetic/`: demo, tests, benchmarks) blurs with scipy.ndimage.
# It is an extra, not a requirement: the preprocessing and training jobs never import it, so Dataflow workers
# (which install REQUIRED from this file) do without scipy.
SYNTHETIC = ["scipy"]
# scikit-multilearn and iterative-stratification are the reference implementations that pipelines/folds.py
# is tested and benchmarked against; scikit-learn is the reference for the F1 and threshold code.
TEST = [
    "pytest",
    "hypothesis",
    "ruff",
    "scikit-multilearn",
    "scikit-learn",
    "iterative-stratification",
    "gcp-storage-emulator",
    *SYNTHETIC,  # the tests render synthetic fixtures
]
# GPU hosts: TensorFlow's `and-cuda` extra brings CUDA, cuDNN, cuBLAS, NCCL... as nvidia-* wheels (Linux only,
# several GB), so no system CUDA is needed. The TF range is REQUIRED's.
GPU = [r.replace("tensorflow", "tensorflow[and-cuda]", 1) for r in REQUIRED if r.startswith("tensorflow>")]
# The installed commands (in .venv/bin after `make setup`), one per job: `hpa-x = package.module:main`, where
# main follows schemas/cli.py's conventions. A new job is one line here.
COMMANDS = [
    "hpa-synthetic = pipelines.synthetic.generator:main",
    "hpa-download = pipelines.download:main",
    "hpa-preprocess = pipelines.preprocess:main",
    "hpa-train = model.train:main",
    "hpa-folds = model.cv:main",
    "hpa-evaluate = model.evaluate:main",
    "hpa-predict = model.predict:main",
    "hpa-batch-predict = pipelines.batch_predict:main",
    "hpa-score = model.score:main",
    "hpa-inspect = model.inspect:main",
    "hpa-doctor = model.doctor:main",
]

setuptools.setup(
    name="hpa-protein-localization",
    version="0.1.0",
    description="Beam preprocessing and Keras training for the Human Protein Atlas image classification task",
    packages=setuptools.find_packages(
        include=["schemas", "schemas.*", "pipelines", "pipelines.*", "model", "model.*"]
    ),
    entry_points={"console_scripts": COMMANDS},
    python_requires=">=3.11,<3.12",
    install_requires=REQUIRED,
    extras_require={"synthetic": SYNTHETIC, "test": TEST, "gpu": GPU},
)
