"""Real deployment: certificates, SuperLink/SuperNode processes and the `flwr` CLI configuration."""
