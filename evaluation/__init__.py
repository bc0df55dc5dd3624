"""The evaluation room: which policy (policies.py), generate and score on fixed prompts and seeds (held_out.py,
also the training loop's held-out monitor), statistics (metrics.py), the report (report.py) and its files
(files.py). The command line is `python -m launcher.evaluate`."""
