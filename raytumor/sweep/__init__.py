"""Sweep stage: YAML search spaces -> Ray Tune + Optuna; leaderboard, best config, report."""
