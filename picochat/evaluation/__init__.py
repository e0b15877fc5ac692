"""Evaluations: bits per byte, CORE, chat tasks."""
