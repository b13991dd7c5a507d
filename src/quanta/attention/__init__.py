"""Attention backends behind one protocol, picked by name (see backend.py)."""
