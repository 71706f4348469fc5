"""reward_workers package."""
