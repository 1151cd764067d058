"""aggregator: the server side of the federated rounds (Flower ServerApp, strategy, checkpoints, releases)."""

import os

# Flower posts usage telemetry to its backend unless told not to; a privacy product does not phone home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
