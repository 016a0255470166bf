"""Fault-injection suite (README, "Testing"): one test per fault, CPU only."""
