"""Scripted stand-ins for STT and TTS providers, for tests and the demo."""
