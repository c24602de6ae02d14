"""Handing tests to xdist workers: durations and the duration-aware planner (pure)."""
