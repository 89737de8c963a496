"""Figures for the lessons. ``core`` sets the shared style; the other modules draw one topic each."""

from .core import CMAP, CMAP_DIVERGING, PALETTE, close, heatmap, load_bars, to_numpy, use_course_style
