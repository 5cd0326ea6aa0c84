"""medlite."""
