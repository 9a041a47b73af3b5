"""Clients of a running gateway, over MQTT only: the terminal wall (`watch`) and the room commands (`room`)."""
