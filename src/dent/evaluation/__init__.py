"""Measuring defenses: clean and robust accuracy, durable results, reports."""
