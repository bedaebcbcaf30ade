"""Driver side: the CLI, planning, scheduling shards on Ray, resume, status."""
