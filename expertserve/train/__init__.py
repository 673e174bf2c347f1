"""Training: Ray Train (`TorchTrainer`) trains an expert's adapter and soft prompts jointly with PEFT."""
