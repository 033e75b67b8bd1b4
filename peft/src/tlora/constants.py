"""Names of the files and folders the project writes and reads back, defined once (as PEFT's `utils/constants.py`)."""

RUN_RECORD_FILE = "run_record.json"  # what a training run did (training core, reports, evaluation output paths)
PLAN_FILE = "tlora_plan.json"  # the TLoRA plan: rank, alpha and sensitivity of every module
PLAN_HEATMAP_FILE = "tlora_plan.png"  # the plan's ranks across layers
TLORA_INIT_FILE = "tlora_init.safetensors"  # TLoRA's frozen A, with a fingerprint of the base weights
INITIAL_ADAPTER_DIR = "initial_adapter"  # the adapter right after a base-modifying initialisation (PiSSA, CorDA, ...)
MERGED_DIR = "merged"  # the merged full model written with --merge
VLLM_EXPORT_FILE = "tlora_vllm_export.json"  # what `tlora.export` folded and padded (written last: the export is whole)
ADAPTER_MANIFEST_FILE = "tlora_adapter.json"  # digests of a run's final files and the base weights' fingerprint
