"""Shared infrastructure the steps build on: the store, the registry and its records, locks, compute, errors.
"""

