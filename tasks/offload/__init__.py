"""Collaborative edge->cloud inference with confidence-, load- and network-gated offloading (see task.py)."""
