"""Transports: Twilio Media Streams, Twilio REST (calls, SMS) and the loopback bridge."""
