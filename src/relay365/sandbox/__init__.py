"""A faithful local Exchange Online for devices, the relay and its tests."""
