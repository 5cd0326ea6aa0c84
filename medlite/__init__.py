"""medlite."""

from medlite import resolvers  # noqa: F401,E402  (config resolvers, needed before Hydra composes)
