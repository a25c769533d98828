"""banditd: a low-latency multi-armed bandit decision server."""

__version__ = "0.1.0"
