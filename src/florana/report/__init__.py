"""Tables and plots from run histories (metrics.jsonl)."""
