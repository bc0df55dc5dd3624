"""Preference data for the reward model: candidate videos on the rollout workers, vote auto-labels, the annotation
page and its label log, the tools' shared config. Imports workers/ and everything below; launcher/ drives it."""
