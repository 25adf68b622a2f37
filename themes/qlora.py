"""qlora-tui's own themes: registered next to Textual's built-ins and picked from the palette."""
from textual.theme import Theme

QLORA_DARK = Theme(
    name="qlora-dark",
    primary="#5FB3F9",
    secondary="#A78BFA",
    accent="#F59E0B",
    warning="#FBBF24",
    error="#F87171",
    success="#34D399",
    foreground="#E5E7EB",
    background="#0F1419",
    surface="#171E26",
    panel="#1F2933",
    dark=True,
    variables={
        "footer-key-foreground": "#F59E0B",
        "input-selection-background": "#5FB3F9 35%",
    },
)

QLORA_LIGHT = Theme(
    name="qlora-light",
    primary="#1D4ED8",
    secondary="#7C3AED",
    accent="#B45309",
    warning="#B45309",
    error="#B91C1C",
    success="#047857",
    foreground="#111827",
    background="#F8FAFC",
    surface="#EEF2F7",
    panel="#E2E8F0",
    dark=False,
    variables={
        "footer-key-foreground": "#1D4ED8",
        "input-selection-background": "#1D4ED8 25%",
    },
)

THEMES = [QLORA_DARK, QLORA_LIGHT]
DEFAULT_THEME = QLORA_DARK.name
