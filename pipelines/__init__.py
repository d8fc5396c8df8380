"""Beam jobs that turn image folders into training shards, and their pure-numpy cores."""
