"""Server side of fedcontinuum: ServerApp, round driver, tracking, launcher."""
