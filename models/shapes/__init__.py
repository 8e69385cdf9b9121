"""The bundled ``shapes`` demo model: its procedural dataset, tokenizer, training and evaluation."""
