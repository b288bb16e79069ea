"""A training run: `build` (checks, then the `Run`), the loop (`train`), the data loader (`loader`),
`optim`, `resume` (changed configs), `distributed` (DDP) and `runlog` (metrics, progress, report)."""
