"""Video QA data: LLaVA-Video annotations, pre-decoded ArrayRecord shards, the Grain training pipeline and
the synthetic long-video set."""
