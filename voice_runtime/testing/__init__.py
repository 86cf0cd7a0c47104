"""Test doubles users can run their own bots against (fakes over real sockets)."""
