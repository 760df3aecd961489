"""Globus Compute integration: the only subpackage that imports globus_compute_*."""
