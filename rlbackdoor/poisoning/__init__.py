"""Poisoning: schedules (when) and payloads (what the attacker wants, reward poisoning)."""
