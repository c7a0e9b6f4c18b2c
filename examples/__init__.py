"""Example applications for dramatiq_kombu_broker."""
