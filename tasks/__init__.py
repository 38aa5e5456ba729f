"""Federated tasks: each is one folder behind one interface (:mod:`tasks.base`)."""
