"""What popauth tells its operator: log lines, journal priorities, Prometheus metrics."""
