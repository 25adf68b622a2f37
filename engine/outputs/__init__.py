"""After a run: merge, GGUF export, model cards and push, generation, serving, Axolotl import."""
