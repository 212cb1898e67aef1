"""Pure index math: which query block sees which key block."""
