"""Simulations: many virtual devices replaying real (or synthetic) logs through the real device code.

- ``simulations.population``: ``build_population`` / ``open_population``: the population directory (each
  device's encrypted tuple store, the server's split), built one device at a time, resumable.
- ``simulations.sources``: shared interaction logs (partitioned by user or session), the synthetic
  generator, directories of per-device raw event logs.
- ``simulations.replay``: interactions -> raw UI events (the activity codec), stored records -> training
  data in the shared vocabulary (``device_dataset``).
- ``simulations.equivalence``: measures how the devices' tuples compare with the centralized protocol's.
- ``simulations.heterogeneity``: availability, dropout, stragglers, deadlines, volume skew; deterministic.
- ``simulations.presets``: named scenarios from ``presets.toml``.

Submodules are imported explicitly (``from simulations.population import ...``) so that importing the
package costs nothing.
"""

import os

# Flower posts usage telemetry to its backend unless told not to; a privacy product does not phone home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
