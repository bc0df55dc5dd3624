"""What every room may need at run time, with no knowledge of the models: checkpoint directories, the metrics log,
process-group set-up, CPU kernel patches. Imports nothing of the project (a bottom room, beside config/)."""
