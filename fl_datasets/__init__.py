"""Loaders and partitioners for fedcontinuum's federated data.

Named ``fl_datasets`` rather than ``datasets``: a top-level ``datasets`` package
would shadow Hugging Face ``datasets``, which flwr-datasets (our partitioners)
imports, and which most Flower users have installed beside us.
"""
