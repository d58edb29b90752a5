"""The consumer: workers that turn queue messages into stored, routed email."""
