"""Scale-out training: process groups and FSDP2 sharding (`parallel`), distributed checkpoints (`dcp`), the
dry-run memory planner (`plan`). The model code never imports these."""
