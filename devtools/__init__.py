"""Developer tools: local mosquitto and influxd on free ports, and the demo. Not part of the running service."""
