"""Models: loading a hub id or a local folder (LoRA and the reference included), building the tiny model,
and building M_old by the pipeline itself (prealign)."""
