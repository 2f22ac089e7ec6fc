"""The embedded synthetic world: generator, policies and programmatic judge."""

from trace_realign.data.world.synthetic import SyntheticWorld, WorldJudge, load_policy

__all__ = ["SyntheticWorld", "WorldJudge", "load_policy"]
