"""Calibration data sources and streaming statistics."""
