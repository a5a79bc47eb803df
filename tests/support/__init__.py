"""Helpers shared by the end-to-end tests: twistd subprocesses, a raw SMTP client, faults."""
