"""Evaluation: validation loss, HellaSwag, and run reports."""
