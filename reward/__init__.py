"""The reward room: the VLM identity reward model (ours and the official checkpoint format) and its trainer, the face
identity reward, demo rewards, their weighted composition. Imports config/, runtime/ and data/ only, never
policy/ (its peer); its trainer (reward/train.py) is an entry point of its own on DeepSpeed, without Ray."""

