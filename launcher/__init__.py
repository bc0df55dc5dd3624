"""The launcher room: entry points (train, evaluate, submit, rehearse, doctor, export, demos) and the driver loop
(train.py, the algorithm top to bottom). The top room of the system: it may import every room but bench/."""

