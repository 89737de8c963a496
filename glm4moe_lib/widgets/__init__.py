"""Interactive ipywidgets controls for the lessons; each also has a static-figure twin in viz."""
