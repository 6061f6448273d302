"""Past one machine, on Ray (an optional extra): merges whose shards are computed by a
cluster's workers (``merge``), and evolutionary recipe search (``evolve``)."""
