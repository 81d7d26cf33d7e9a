"""Crash tests: a store killed at any instruction, its state adopted and recovered."""
