"""Real mounts: fio verification, the kernel swapping through loop devices, the commands, the daemon's failover, systemd units."""
