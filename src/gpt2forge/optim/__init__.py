"""Optimizers from named parameter groups, and their schedules (filled in by the seams work)."""
