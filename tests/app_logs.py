"""A hotel kiosk's own interaction log: seven action types of its own, none of them JD's.

Guests browse rooms in small "floors" (chains of rooms), so the next room is predictable; every visit
views the room and then does one or two of the other actions. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Raw action name in the log -> the activity the mapping gives it (seven activities: no collapsing).
HOTEL_ACTIONS = {
    "view_room": "ViewRoom",
    "photos": "Photos",
    "reviews": "Reviews",
    "amenities": "Amenities",
    "map": "Map",
    "wishlist": "Wishlist",
    "book": "Book",
}
HOTEL_ACTIVITIES = tuple(HOTEL_ACTIONS.values())
HOTEL_MAPPING_TOML = 'drop = ["cancel"]\nconversions = ["Book"]\n[actions]\n' + "".join(
    f'{raw} = "{activity}"\n' for raw, activity in HOTEL_ACTIONS.items()
)


def write_hotel_log(
    directory: Path, users: int = 40, sessions: int = 4, rooms: int = 24, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``hotel.csv`` (user_id, timestamp, item_id, action) and ``hotel_mapping.toml``; returns both."""
    rng = np.random.default_rng(seed)
    others = [a for a in HOTEL_ACTIONS if a != "view_room"]
    lines = ["user_id,timestamp,item_id,action"]
    start = 1_700_000_000
    for user in range(users):
        t = start + int(rng.integers(0, 3600))
        for _ in range(sessions):
            room = int(rng.integers(0, rooms))
            for _ in range(int(rng.integers(3, 7))):
                lines.append(f"g{user},{t},room-{room},view_room")
                t += int(rng.integers(5, 60))
                for action in rng.choice(others, size=int(rng.integers(1, 3)), replace=False):
                    lines.append(f"g{user},{t},room-{room},{action}")
                    t += int(rng.integers(5, 90))
                if rng.random() < 0.05:
                    lines.append(f"g{user},{t},room-{room},cancel")  # dropped by the mapping
                # Mostly the next room on the floor: sequential structure a model can learn.
                room = (room + 1) % rooms if rng.random() < 0.8 else int(rng.integers(0, rooms))
                t += int(rng.integers(10, 120))
            t += 3 * 3600 + int(rng.integers(0, 24 * 3600))  # the next stay search, hours later
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "hotel.csv"
    log.write_text("\n".join(lines) + "\n")
    mapping = directory / "hotel_mapping.toml"
    mapping.write_text(HOTEL_MAPPING_TOML)
    return log, mapping
