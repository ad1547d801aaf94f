"""`loraq run` / `loraq status`: the YAML config, the stage chain and its checkpoints."""
