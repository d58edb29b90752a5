"""The scheduler: one acting instance (a lease row) that ticks every schedule_interval seconds."""
