"""The shard-group runtime: the only subpackage that imports torch, transformers and deepspeed."""
