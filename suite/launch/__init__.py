"""The launch stage: the command line, preflight, the sweep's cells and jobs, launchers, claims
on cells, GPU slots, and the guard on what a config may instantiate."""
