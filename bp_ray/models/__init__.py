"""Model zoo: one loader per role, tiny builders, tokenizers."""
