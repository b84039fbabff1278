"""The console scripts vaelab-train, vaelab-eval and vaelab-generate: each builds, runs and reports."""
