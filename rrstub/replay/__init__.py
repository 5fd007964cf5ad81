"""The replay timeline: positions, checkpoints, seeking and reverse execution over a recording."""
