"""Policies, baselines and meta-learners."""
