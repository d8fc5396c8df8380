"""Keras training package: config, input pipeline, model, losses, thresholds, training and prediction."""

from schemas import console

console.quiet_imports()  # a command silences TensorFlow's start-up lines before anything imports it
