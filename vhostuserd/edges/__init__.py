"""Where the broker meets the system: directory scans and watches, probes, processes and their
supervision, records in /run, cgroups, user namespaces, the polkit client and trust checks.
Imports only `vhostuserd.core` of the project: docs/architecture.md."""
