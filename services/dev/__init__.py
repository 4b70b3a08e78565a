"""Tooling for running the system on one machine and in tests: local Redis and S3 servers, the
embedded default model, a random checkpoint writer, free ports. Deployed services do not import it."""
