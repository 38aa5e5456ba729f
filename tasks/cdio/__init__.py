"""CDIO (paper 004): federated resource-preference prediction + combinatorial UCB placement (see task.py)."""
