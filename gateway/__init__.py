"""Infusion Room Telemetry gateway."""
