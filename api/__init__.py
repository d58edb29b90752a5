"""The read API process: stored mail over HTTP for the application."""
