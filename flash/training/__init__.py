"""Training a FLASH draft: the corpus of media and prompts, distillation of the target's own
answers and hidden states, and the trainer."""
