"""Experiments: config composition and validation, the one experiment skeleton, MLflow tracking."""
