"""Reusable benchmark pieces (problems, reference implementations, measurement, reports).

Scripts in ``scripts/`` only parse arguments and call into these modules.
"""
