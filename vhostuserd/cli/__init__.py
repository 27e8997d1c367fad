"""``vhostuserctl``: argument parsing, output, the offline and online commands, the man pages
and the shell completion. Talks to the daemon through `vhostuserd.client` only, and never
imports `vhostuserd.bus` or `vhostuserd.edges`: docs/architecture.md."""
