"""Test and demo infrastructure: the loopback HPC site (Unix users, munge, slurm.conf, sshd, the bind
helper) and the torchvision start-up shim. maelflow's core never imports this package; it finds the
loopback site's service, its placeholders and the bind helper through entry points when this
distribution is installed."""
