"""The round engine: the round driver, virtual clock, reply screening, fault handling, byte accounting, SecAgg+, checkpoints."""
