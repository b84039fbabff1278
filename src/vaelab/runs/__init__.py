"""Run plumbing: every setting and its rules, run directories and resume, checkpoints read as untrusted input,
guards, sweeps, hardware."""
