"""What every trainer shares: the run folder, checkpoints that survive kills and full disks."""
