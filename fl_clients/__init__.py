"""Client side of fedcontinuum: the ClientApp, client tasks and models."""
