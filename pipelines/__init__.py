"""Beam jobs that turn image folders into training shards, and their pure-numpy cores."""

from schemas import console

console.quiet_imports()  # a command silences TensorFlow's and Beam's start-up lines before they load
