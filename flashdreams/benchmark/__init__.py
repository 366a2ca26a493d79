"""fd-bench: latency, throughput, memory and power of sessions, per backend, in one process."""
