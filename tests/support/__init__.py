"""Test helpers: real service processes, free ports, readiness waits."""
