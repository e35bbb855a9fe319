"""Fine-tuning: upstream's training losses (`llm_loss`, `flow_loss`), the optax train step (`step`),
LoRA adapters (`lora`), data lists (`data`), checkpoints (`checkpoint`) and `cosyjax finetune` (`cli`)."""
