"""The workers room: Ray actors (rollout, reward, DeepSpeed learner, evaluation) in worker groups on placement
groups, weight sync between them, attaching to the Ray cluster, and the run config they build from
(run_config.py). Imports evaluation/ and everything below; prefdata/ and launcher/ drive it."""

