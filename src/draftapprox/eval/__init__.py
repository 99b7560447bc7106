"""Accuracy evaluation: an offline RULER generator (`ruler`), its scoring (`metrics`), a resumable grid runner
(`harness`), the report (`report`) and drivers for peer implementations in their own environments (`peers`)."""
