"""plain-fedavg: a plain Flower FedAvg baseline for the overhead benchmark."""
