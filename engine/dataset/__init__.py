"""Data in: formats, chat templates and the label mask, the inspector, token counts, quality checks."""
