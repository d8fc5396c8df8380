"""Keras training package: config, input pipeline, model, losses, thresholds, training and prediction."""
