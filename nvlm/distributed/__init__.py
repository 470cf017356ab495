"""Scale-out training: process groups and FSDP2 sharding (`parallel`), tensor parallelism and the parallel layout
(`tensor_parallel`), distributed checkpoints (`dcp`). The model code never imports these, and these never import
the trainer (``nvlm.training`` builds on them)."""
