"""Federated workload forecasting: one edge site per client (TCN / LSTM)."""
