"""What peagle writes and must never lose: checkpoints (`checkpoint`), the speculators-format export
(`export`) and run directories (`rundir`: destination checks, the run lock, what peagle wrote)."""
