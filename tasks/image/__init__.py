"""Image classification under class imbalance (MNIST 5k, MedMNIST)."""
