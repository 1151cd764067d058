"""rib_edge."""
