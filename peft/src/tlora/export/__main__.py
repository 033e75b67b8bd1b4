"""`python -m tlora.export ADAPTER OUT [--max_lora_rank N]`: a plain LoRA copy of an adapter for vLLM."""

from .vllm import main

if __name__ == "__main__":
    main()
