"""Training: the loop, schedules (LR, context-length curriculum), chunked loss, memory tools, planner."""
