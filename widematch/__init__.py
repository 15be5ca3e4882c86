"""widematch's helper package: machinery the stage scripts share (they stay at the top level, one per stage)."""
