"""Native development servers — RabbitMQ, Haraka, Dovecot, PostgreSQL — started for real,
without a container engine: used by `make run`, the tests and the benchmarks. Each launcher
finds or installs its server, gives it a private folder and free ports, and stops it."""
