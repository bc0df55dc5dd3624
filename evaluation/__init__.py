"""The evaluation room: which policy (policies.py), generate and score on fixed prompts and seeds (held_out.py,
also the training loop's held-out monitor), statistics (metrics.py), the report (report.py) and its files
(files.py). Imports policy/, reward/ and below; the command line is `python -m launcher.evaluate`."""
